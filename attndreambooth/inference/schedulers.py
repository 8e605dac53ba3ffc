"""The samplers infer.py and validation offer, by name (no torch import: `infer.py --help` reads it)."""

SCHEDULERS = {  # name -> diffusers class name
    "dpm++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",  # rectified-flow models (FLUX.1): their own sampler
}
