"""`python tests/sharded_on_cpu.py ARGS` = `lora ARGS`, with Accelerate's FSDP or DeepSpeed on CPU processes.

Accelerate keeps FSDP and DeepSpeed for accelerator processes: on CPUs it ignores `ACCELERATE_USE_FSDP`
and `ACCELERATE_USE_DEEPSPEED`, so CI could not reach those code paths without GPUs. This shim changes
only that decision; the rest — torch's FSDP2 sharding, DeepSpeed's ZeRO engine on its CPU accelerator
(gloo), Accelerate's prepare, our adapter gathering and optimizer checkpoints — runs as on GPUs. Run it
under torchrun with the variables `accelerate launch --config_file configs/accelerate/….yaml` sets.
"""

import os

import accelerate
import accelerate.state as state
from accelerate.utils import DistributedType

if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    _state_init = state.AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        _state_init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]

    state.AcceleratorState.__init__ = _fsdp_on_cpu

if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # with DS_ACCELERATOR=cpu, ACCELERATE_TORCH_DEVICE=cpu
    _acc_init = accelerate.Accelerator.__init__

    def _deepspeed_on_cpu(self, *args, **kwargs):
        _acc_init(self, *args, **{**kwargs, "cpu": False})

    accelerate.Accelerator.__init__ = _deepspeed_on_cpu
    state.PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_GPU)

if __name__ == "__main__":
    from lora_cli.cli import main

    main()  # (as the `lora` command: it reads sys.argv)
