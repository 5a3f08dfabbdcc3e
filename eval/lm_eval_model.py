"""`hf-dga`: lm-evaluation-harness's `hf` model, patched with DGA after loading; and `dga-lm-eval`, the `lm_eval`
command with `hf-dga` registered.

    dga-lm-eval run --model hf-dga --model_args pretrained=PATH,dga=paper,dga_local_blocks=8 \\
        --tasks niah_single_1 --metadata '{"max_seq_lengths": [4096]}'

Model arguments: `dga` = a preset name (default: the shipped default preset); `dga_<field>` = any
`DGAConfig` field, cast to the field's type (`dga_dense_layers=0;1` for a list); all others go to `hf`.

Several processes share the samples as with `hf` (docs/evaluation.md):

    accelerate launch --multi_gpu --num_processes 2 -m dga_eval.lm_eval_model run --model hf-dga ...

`hf` shares them only when it counts several GPUs (lm_eval/models/huggingface.py, 0.4.x); on a machine without
CUDA `hf-dga` sets up accelerate's CPU process group (gloo) itself and shares them too, where `hf` would have
every process score every sample.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import dga_hf
from dga_hf import DGAConfig, distributed

from .runconfig import named_dga_config

PREFIX = "dga_"


def dga_config_from_model_args(preset: str | None, fields: dict[str, Any]) -> DGAConfig:
    return named_dga_config({"preset": preset or "default", **fields})[1]


@register_model("hf-dga")
class DGAHFLM(HFLM):
    """`HFLM` whose model runs DGA: every `hf` argument works as for `hf`."""

    def __init__(self, pretrained, dga: str | None = None, **kwargs) -> None:
        fields = {name[len(PREFIX):]: kwargs.pop(name) for name in list(kwargs) if name.startswith(PREFIX)}
        self.dga_config = dga_config_from_model_args(dga, fields)  # before loading: bad settings fail fast
        distributed.check_launch()
        cpu_processes = distributed.world_size() > 1 and not torch.cuda.is_available() and isinstance(pretrained, str)
        if cpu_processes and int(transformers.__version__.split(".")[0]) < 5:
            raise RuntimeError(
                "hf-dga on several CPU processes needs transformers >= 5: lm-eval loads each process's model with "
                f"device_map 'cpu:<rank>', which transformers {transformers.__version__} refuses ('device cpu:0 is "
                "invalid'); run one process, or upgrade transformers"
            )
        if cpu_processes:
            from accelerate import PartialState

            PartialState(cpu=True)  # before HFLM's Accelerator(), which then joins this gloo process group
        super().__init__(pretrained=pretrained, **kwargs)
        if cpu_processes:  # hf takes its rank and world size from accelerate only when it counts several GPUs
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        dga_hf.patch(self.model, self.dga_config)
        print(f"hf-dga [process {self.rank + 1} of {self.world_size}]: model loaded and patched on {self.device}",
              file=sys.stderr, flush=True)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "dga": self.dga_config.to_dict()}


def main() -> None:
    """Exactly the `lm_eval` command (same arguments, from sys.argv), with `hf-dga` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
