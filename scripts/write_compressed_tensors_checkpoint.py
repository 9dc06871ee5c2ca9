"""Write a tiny Llama checkpoint in the compressed-tensors format with the format's own library.

Usage (in an environment with ``compressed-tensors`` and ``transformers``)::

    python scripts/write_compressed_tensors_checkpoint.py OUT_DIR SCHEME   # SCHEME: W8A8 | FP8_DYNAMIC

The model is the conformance suite's tiny Llama config with seeded weights; the weight scales are the
round-to-nearest ones (amax / QMAX per output channel), set on the modules the library initialised, and the
library compresses and writes the checkpoint and its ``quantization_config``.
"""
from __future__ import annotations

import json
import sys

import torch


def main(out_dir: str, scheme: str, config_json: str) -> None:
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config, preset_name_to_scheme)

    cfg_d = json.loads(config_json)
    kw = {k: v for k, v in cfg_d.items() if k not in ("architectures", "model_type")}
    cfg = transformers.AutoConfig.for_model(cfg_d["model_type"], **kw)
    cfg.architectures = list(cfg_d["architectures"])
    torch.manual_seed(0)
    model = getattr(transformers, cfg_d["architectures"][0])._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    qs = preset_name_to_scheme(scheme, ["Linear"])
    qcfg = QuantizationConfig(config_groups={"group_0": qs}, ignore=["lm_head"])
    apply_quantization_config(model, qcfg)
    qmax = 127.0 if scheme == "W8A8" else 448.0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "weight_scale"):
                amax = mod.weight.abs().amax(dim=1, keepdim=True)
                mod.weight_scale.data = (amax / qmax).to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
                if hasattr(mod, "weight_zero_point"):
                    mod.weight_zero_point.data.zero_()
            if hasattr(mod, "quantization_status"):
                mod.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
