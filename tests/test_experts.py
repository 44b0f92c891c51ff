"""GroupedExperts (train/models/experts.py) computes what Megatron-Core's SequentialMLP computes (fp32, CPU).

The same expert weights go into both; the same tokens (sorted by expert, one expert without any), token counts
and routing weights come out as the same output and the same gradient for the tokens, the weights and the
routing weights. Both kernels of GroupedExperts are checked: `torch._grouped_mm` (where this PyTorch has it on
CPU) and the loop over experts.
"""

from __future__ import annotations

import pytest
import torch

from tests.megatron_cpu import init_megatron_cpu
from train.models import experts as experts_mod

E, HIDDEN, INTER = 4, 32, 24
COUNTS = [5, 0, 9, 3]


def _config():
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64, moe_ffn_hidden_size=INTER,
        num_moe_experts=E, moe_router_topk=2, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, perform_initialization=False, bias_activation_fusion=False,
    )


def _sequential(config):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)
    return build_module(spec.submodules.experts, E, config, pg_collection=get_default_pg_collection())


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_experts_equal_sequential_mlp_forward_and_gradients(grouped):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    if grouped and not experts_mod._grouped_mm_runs("cpu", torch.float32):
        pytest.skip("this PyTorch has no torch._grouped_mm on CPU; the loop kernel is checked by the other case")
    init_megatron_cpu()
    config = _config()
    ours = experts_mod.GroupedExperts(E, config, pg_collection=get_default_pg_collection(), grouped=grouped)
    ref = _sequential(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.gate_up_proj.copy_(torch.randn(E, 2 * INTER, HIDDEN, generator=g) * 0.2)
        ours.down_proj.copy_(torch.randn(E, HIDDEN, INTER, generator=g) * 0.2)
        for e, mlp in enumerate(ref.local_experts):
            mlp.linear_fc1.weight.copy_(ours.gate_up_proj[e])  # [gate; up], as the converter lays fc1 out
            mlp.linear_fc2.weight.copy_(ours.down_proj[e])
    tokens = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    probs = torch.rand(sum(COUNTS), generator=g)
    counts = torch.tensor(COUNTS)
    grad_out = torch.randn(sum(COUNTS), HIDDEN, generator=g)

    def run(module):
        x, p = tokens.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = module(x, counts, p)
        assert bias is None
        out.backward(grad_out)
        return out.detach(), x.grad, p.grad

    (o1, gx1, gp1), (o2, gx2, gp2) = run(ours), run(ref)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gp1, gp2, rtol=1e-5, atol=1e-5)
    for e, mlp in enumerate(ref.local_experts):
        torch.testing.assert_close(ours.gate_up_proj.grad[e], mlp.linear_fc1.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.down_proj.grad[e], mlp.linear_fc2.weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.gate_up_proj.grad[1].abs().sum() == 0  # the expert without tokens


def test_grouped_experts_with_no_tokens_at_all():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    init_megatron_cpu()
    ours = experts_mod.GroupedExperts(E, _config(), pg_collection=get_default_pg_collection())
    torch.nn.init.normal_(ours.gate_up_proj)
    torch.nn.init.normal_(ours.down_proj)
    out, _ = ours(torch.zeros(0, HIDDEN), torch.zeros(E, dtype=torch.long), torch.zeros(0))
    assert out.shape == (0, HIDDEN)
