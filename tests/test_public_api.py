"""The names docs/design.md promises users (its Contracts) are where it says they are."""

import helios_jax as hj


def test_design_contract_names():
    for name in ("load_transformer", "load_vae", "load_text_encoder", "HeliosTransformer", "WanVAE", "UMT5Encoder",
                 "HeliosPipeline", "PromptEncoder", "TransformerConfig", "VAEConfig", "UMT5Config"):
        assert hasattr(hj, name), name
    assert callable(hj.sampling.make_schedule)
    assert callable(hj.models.attention.attention)
    assert callable(hj.HeliosPipeline.from_pretrained) and callable(hj.HeliosPipeline.stream)
    from helios_jax import convert, kernels

    assert callable(convert.load_params) and callable(kernels.flash_attention)


def test_runtime_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, helios_jax, helios_jax.cli, helios_jax.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
