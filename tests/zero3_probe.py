"""Run by the ZeRO-3 round-trip test under the DeepSpeed launcher: the real SFT entry point, and
right after it saves, every parameter gathered from its ZeRO-3 shards is written beside the
checkpoint (`gathered.safetensors`) so the test can compare the two."""

from __future__ import annotations

from pathlib import Path

from models.train import common, sft

_save_hf = common.DeepSpeedStrategy.save_hf


def _save_and_dump(self, model, tokenizer, out_dir, **kwargs):
    import deepspeed
    from safetensors.torch import save_file

    out = _save_hf(self, model, tokenizer, out_dir, **kwargs)
    gathered = {}
    for name, param in model.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # collective: every rank takes part
            gathered[name] = param.detach().clone().cpu()
    if self.is_rank0():
        save_file(gathered, str(Path(out_dir).parent / "gathered.safetensors"))
    self.barrier()
    return out


common.DeepSpeedStrategy.save_hf = _save_and_dump

if __name__ == "__main__":
    sft.main()
