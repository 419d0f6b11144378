"""What the schedule and sampler tests share: SD's scheduler config and the diffusers scheduler (the oracle) that a
pipeline would build for one of our samplers from it."""
from backdrop.diffusion.schedule import RECIPES
from backdrop.nn.config import SchedulerConfig

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)  # SD1.x/2.x config


def sched_config(**kw) -> SchedulerConfig:
    return SchedulerConfig(**(SD | kw))


def scheduler_options(name: str) -> dict:
    """The from_config options that make diffusers' scheduler class for sampler `name` run as that sampler."""
    kw = {"use_karras_sigmas": True} if name.endswith("karras") else {}
    if name.startswith("dpmpp"):
        kw |= dict(algorithm_type="sde-dpmsolver++" if "sde" in name else "dpmsolver++", solver_order=2)
    if name == "pndm":
        kw["skip_prk_steps"] = True  # PLMS, as SD's scheduler_config.json sets
    return kw


def diffusers_scheduler(name: str, cfg: SchedulerConfig | dict, prediction_type: str = "epsilon"):
    """The diffusers scheduler a pipeline would build for sampler `name` from this scheduler_config.json (our
    SchedulerConfig, or a diffusers scheduler's config as it is)."""
    import diffusers

    config = cfg.to_diffusers(prediction_type) if isinstance(cfg, SchedulerConfig) else cfg
    return getattr(diffusers, RECIPES[name].scheduler).from_config(config, **scheduler_options(name))
