"""serve/control.py's field checks the HTTP tests (tests/test_serve_controlnet.py) leave open, called directly with the
server's defaults (Pipeline.inpaint's): null fields on a server without a ControlNet, the guidance window's bounds and
its empty window, negative scales (diffusers takes any float), a list of the wrong length for several ControlNets, the
defaults filled in, the names in messages, and alpha dropped from a control image."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from backdrop.serve.control import control_fields, decode_controls
from backdrop.serve.inputs import APIError
from backdrop.serve.server import DEFAULT


def png(mode: str = "RGB", size=(32, 32)) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 40)[:len(mode)]).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def refused(fields: dict, nets: int, param: str, says: str) -> None:
    with pytest.raises(APIError) as e:
        control_fields(fields, nets, DEFAULT)
    assert e.value.status == 400 and e.value.param == param, (e.value.param, e.value.message)
    assert says in e.value.message, e.value.message


def test_a_server_without_controlnet_takes_null_control_fields():
    assert control_fields({"control_image": None, "guess_mode": None, "control_guidance_end": None}, 0, DEFAULT) == \
        (None, {})


def test_defaults_are_the_pipelines_one_per_controlnet():
    data, options = control_fields({"control_image": [png(), png()]}, 2, DEFAULT)
    assert len(data) == 2
    assert options == dict(controlnet_conditioning_scale=(0.5, 0.5), control_guidance_start=(0.0, 0.0),
                           control_guidance_end=(1.0, 1.0), guess_mode=False)
    assert (DEFAULT["controlnet_conditioning_scale"], DEFAULT["control_guidance_end"]) == (0.5, 1.0)


def test_the_window_and_scales_are_checked_as_the_pipeline_checks_them():
    good = png()
    refused({"control_image": good, "control_guidance_start": -0.1}, 1, "control_guidance_start", "[0.0, 1.0]")
    refused({"control_image": good, "control_guidance_end": 1.5}, 1, "control_guidance_end", "[0.0, 1.0]")
    refused({"control_image": good, "control_guidance_start": 0.5, "control_guidance_end": 0.5}, 1,
            "control_guidance_start", "control_guidance_start 0.5 must be below control_guidance_end 0.5")
    _, options = control_fields({"control_image": good, "controlnet_conditioning_scale": -0.5}, 1, DEFAULT)
    assert options["controlnet_conditioning_scale"] == (-0.5,)  # diffusers takes any float


def test_several_controlnets_want_one_value_or_one_each_and_messages_name_the_field():
    good = png()
    refused({"control_image": [good, good], "controlnet_conditioning_scale": [0.5]}, 2,
            "controlnet_conditioning_scale", "1 values for this server's 2 ControlNets; give one number")
    refused({"control_image": 3}, 2, "control_image", "got 3")
    refused({"control_image": "%%%"}, 1, "control_image", "control_image is not valid base64")
    refused({"control_image": [good, "%%%"]}, 2, "control_image", "control_image[1] is not valid base64")


def test_decoded_control_images_are_rgb():
    images = decode_controls([base64.b64decode(png("RGBA")), base64.b64decode(png("L"))], 10**6)
    assert [im.mode for im in images] == ["RGB", "RGB"]
    assert np.asarray(images[0])[0, 0].tolist() == [10, 20, 30]
