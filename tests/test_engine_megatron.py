"""The GPU resume path's workaround around Megatron's distributed optimizer without Apex/TE.

Megatron's optimizers need CUDA, so a stand-in with the same two attributes (`chained_optimizers`, each with
the torch `optimizer` inside and `load_parameter_state`) is loaded the way Megatron leaves things after its
`load_state_dict`: one shared "step" tensor in every parameter's AdamW state.
"""

from __future__ import annotations

import torch

from train.engine_megatron import load_parameter_state


class _DistOptStandIn:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.loaded_from = None

    def load_parameter_state(self, filename: str) -> None:
        # Megatron copies every key of each parameter's state from the file, which has no "step"
        for st in self.optimizer.state.values():
            assert set(st) == {"exp_avg", "exp_avg_sq"}, f"Megatron would raise KeyError on {set(st) - {'exp_avg', 'exp_avg_sq'}}"
        self.loaded_from = filename


class _Chained:
    def __init__(self, *opts):
        self.chained_optimizers = list(opts)

    def load_parameter_state(self, filename: str) -> None:
        for o in self.chained_optimizers:
            o.load_parameter_state(filename)


def _adamw_after(steps: int, params):
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return opt


def test_resume_keeps_one_adam_step_per_parameter(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    saved = _adamw_after(3, params).state_dict()
    shared = torch.tensor(3.0)
    for st in saved["state"].values():
        st["step"] = shared  # what Megatron's load_state_dict does without Apex/TE
    resumed = torch.optim.AdamW(params, lr=1e-3)
    resumed.load_state_dict(saved)
    stand_in = _DistOptStandIn(resumed)
    load_parameter_state(_Chained(stand_in), tmp_path / "optim_params_tp00.pt")
    assert stand_in.loaded_from == str(tmp_path / "optim_params_tp00.pt")
    for p in params:
        p.grad = torch.ones_like(p)
    resumed.step()
    # shared, the step would have been bumped once per parameter (7.0); each parameter is at step 4
    assert [float(resumed.state[p]["step"]) for p in params] == [4.0] * 4


def test_unchained_optimizer_too(tmp_path):
    params = [torch.nn.Parameter(torch.randn(2))]
    opt = _adamw_after(1, params)
    stand_in = _DistOptStandIn(opt)
    load_parameter_state(stand_in, tmp_path / "x.pt")
    assert float(opt.state[params[0]]["step"]) == 1.0
