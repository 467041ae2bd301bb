"""Tests for fl_unlearn.fisher: parameter selection, the three estimators, the accumulator, the checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_unlearn.errors import ConfigError, FisherError
from fl_unlearn.fisher import (
    FisherAccumulator,
    check_fisher,
    compute_fisher,
    fisher_num_elements,
    select_parameters,
    validate_fisher,
)

RTOL, ATOL = 1e-5, 1e-9


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def bn_cnn() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


def batches_for(model: nn.Module, sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (6,) if isinstance(model[0], nn.Linear) else (1, 6, 6)
    return [(torch.randn(n, *shape, generator=gen), torch.randint(0, 4, (n,), generator=gen)) for n in sizes]


def brute_batch(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean loss, one backward per batch."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in names:
            sums[n] += params[n].grad ** 2
    return {n: s / len(batches) for n, s in sums.items()}


def brute_per_sample(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """Mean over samples of squared single-sample gradients, one backward per sample."""
    single = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(len(y))]
    fisher = brute_batch(model, single, names)
    return fisher


def brute_expected(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """Mean over samples of ``sum_c p_c (grad log p_c)^2``, one backward per sample and class."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    for x, _ in batches:
        for i in range(len(x)):
            log_probs = F.log_softmax(model(x[i : i + 1]), dim=1)[0]
            for c in range(len(log_probs)):
                grads = torch.autograd.grad(log_probs[c], [params[n] for n in names], retain_graph=True)
                for n, g in zip(names, grads):
                    sums[n] += log_probs[c].exp().detach() * g**2
            count += 1
    return {n: s / count for n, s in sums.items()}


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# select_parameters
# --------------------------------------------------------------------------------------------


def test_select_last_is_the_last_linear() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), nn.Softmax(dim=1))
    assert select_parameters(model, "last") == ["1.1.weight", "1.1.bias"]


def test_select_all_and_patterns() -> None:
    model = cnn()
    assert select_parameters(model, "all") == [n for n, _ in model.named_parameters()]
    assert select_parameters(model, "0.*, 3.bias") == ["0.weight", "0.bias", "3.bias"]
    assert select_parameters(model, ["*.bias"]) == ["0.bias", "3.bias"]


def test_select_unmatched_pattern_lists_names() -> None:
    with pytest.raises(ConfigError, match=r"fc\.\*.*0\.weight, 0\.bias"):
        select_parameters(cnn(), "fc.*")


def test_select_last_without_linear() -> None:
    with pytest.raises(ConfigError, match="no.*0.weight"):
        select_parameters(nn.Sequential(nn.Conv2d(1, 2, 3)), "last")


def test_select_all_but_first_leaves_out_the_input_layer_only() -> None:
    from fl_unlearn.models import build_model

    small = build_model("cnn", 10, in_channels=1, image_size=28)
    names = [n for n, _ in small.named_parameters()]
    assert select_parameters(small, "all-but-first") == [n for n in names if not n.startswith("features.0.")]
    resnet = build_model("resnet18", 100, in_channels=3, image_size=32)
    names = [n for n, _ in resnet.named_parameters()]
    assert names[0] == "conv1.weight" and select_parameters(resnet, " all-but-first ") == names[1:]
    # a linear model whose only layer is the first, or a model without one: a clear error, naming the parameters
    with pytest.raises(ConfigError, match="leaves no parameter.*1.weight"):
        select_parameters(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "all-but-first")
    with pytest.raises(ConfigError, match="has none.*0.weight"):
        select_parameters(nn.Sequential(nn.BatchNorm1d(3)), "all-but-first")


def test_select_empty_spec() -> None:
    with pytest.raises(ConfigError, match="Empty"):
        select_parameters(cnn(), " , ")


# --------------------------------------------------------------------------------------------
# compute_fisher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [mlp, cnn, bn_cnn])
def test_batch_estimator_equals_loop_over_batches(factory) -> None:
    model = factory()
    batches = batches_for(model, [5, 3, 7])
    names = select_parameters(model, "all")
    assert_close(compute_fisher(model, batches, names, estimator="batch"), brute_batch(model, batches, names))


@pytest.mark.parametrize("factory", [mlp, cnn, bn_cnn])
def test_per_sample_estimator_equals_loop_over_samples(factory) -> None:
    model = factory()
    batches = batches_for(model, [5, 3, 7])
    names = select_parameters(model, "all")
    fisher = compute_fisher(model, batches, names, estimator="per_sample")
    assert_close(fisher, brute_per_sample(model, batches, names))
    assert (fisher.info.num_samples, fisher.info.num_batches) == (15, 3)


def test_per_sample_equals_batch_estimator_with_batch_size_one() -> None:
    model = mlp()
    batches = batches_for(model, [1] * 6)
    names = select_parameters(model, "last")
    assert_close(compute_fisher(model, batches, names, estimator="per_sample"),
                 compute_fisher(model, batches, names, estimator="batch"))


@pytest.mark.parametrize("factory", [mlp, cnn, bn_cnn])
@pytest.mark.parametrize("jacobian_fits", [True, False])
def test_expected_estimator_equals_loop_over_samples_and_classes(factory, jacobian_fits: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_unlearn.fisher as fisher_module

    if not jacobian_fits:  # the one-class-at-a-time path that large models take
        monkeypatch.setattr(fisher_module, "_VMAP_ELEMENTS", 16)
    model = factory()
    batches = batches_for(model, [3, 5])
    names = select_parameters(model, "all")
    fisher = compute_fisher(model, batches, names, estimator="expected")
    assert_close(fisher, brute_expected(model, batches, names))
    assert fisher.info.estimator == "expected" and fisher.info.num_samples == 8


def strided_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
                         nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(18, 4))


class _TwiceLinear(nn.Module):
    """One registered layer, called twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


class _BatchCentred(nn.Module):
    """Mixes the samples of a batch even in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def inplace_relu_cnn() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def shared_linear() -> nn.Module:
    torch.manual_seed(4)
    layer = nn.Linear(6, 6)
    return nn.Sequential(layer, nn.Tanh(), layer, nn.Linear(6, 4))


def twice_linear() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 6), _TwiceLinear(), nn.Linear(6, 4))


def batch_centred() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(6, 6), _BatchCentred(), nn.Tanh(), nn.Linear(6, 4))


@pytest.mark.parametrize("factory, by_layers", [(mlp, True), (cnn, True), (strided_cnn, True), (bn_cnn, False),
                                                (twice_linear, False), (inplace_relu_cnn, False)])
def test_expected_estimator_from_the_layers_where_their_formula_holds(factory, by_layers: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear and Conv2d layers that run once: one forward and a backward per class; anything else (BatchNorm
    parameters, a layer called twice, an in-place ReLU on a layer's output): the per-sample path. Either way the loop over samples and classes."""
    import fl_unlearn.fisher as fisher_module

    taken = []
    real = fisher_module._expected_by_layers
    monkeypatch.setattr(fisher_module, "_expected_by_layers",
                        lambda *args: taken.append(result := real(*args)) or result)
    model = factory()
    batches = batches_for(model, [3, 5])
    for names, fits in ((select_parameters(model, "all"), by_layers), (select_parameters(model, "last"), True)):
        taken.clear()
        assert_close(compute_fisher(model, batches, names, estimator="expected"),
                     brute_expected(model, batches, names))
        assert [t is not None for t in taken] == [fits] * 2  # the last Linear alone is always from its layer


@pytest.mark.parametrize("factory", [shared_linear, batch_centred])
def test_expected_fisher_from_the_layers_refuses_shared_layers_and_samples_that_mix(factory) -> None:
    from fl_unlearn.fisher import _expected_by_layers

    model = factory().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert _expected_by_layers(model, params, {}, batches_for(model, [4])[0][0]) is None


def test_expected_estimator_ignores_labels_and_differs_from_the_empirical_one() -> None:
    model = cnn()
    batches = batches_for(model, [6])
    relabelled = [(x, (y + 1) % 4) for x, y in batches]
    names = select_parameters(model, "all")
    expected = compute_fisher(model, batches, names, estimator="expected")
    assert_close(compute_fisher(model, relabelled, names, estimator="expected"), expected)
    empirical = compute_fisher(model, batches, names, estimator="per_sample")
    assert not torch.allclose(expected["3.weight"], empirical["3.weight"])


@pytest.mark.parametrize("estimator", ["batch", "per_sample", "expected"])
def test_only_selected_parameters_fp32_nonnegative(estimator: str) -> None:
    model = cnn().double()
    batches = [(x.double(), y) for x, y in batches_for(model, [4, 4])]
    fisher = compute_fisher(model, batches, ["3.weight"], estimator=estimator)
    assert list(fisher) == ["3.weight"]
    assert fisher["3.weight"].dtype == torch.float32
    assert fisher["3.weight"].shape == model[3].weight.shape
    assert (fisher["3.weight"] >= 0).all()


@pytest.mark.parametrize("estimator", ["batch", "per_sample", "expected"])
def test_compute_fisher_leaves_model_untouched(estimator: str) -> None:
    model = bn_cnn()
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    model[0].bias.requires_grad_(False)
    model[5].weight.grad = torch.full_like(model[5].weight, 7.0)
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    compute_fisher(model, batches_for(model, [4, 4]), select_parameters(model, "all"), estimator=estimator)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True, True, True]
    assert torch.equal(model[5].weight.grad, torch.full_like(model[5].weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "5.weight")


def test_max_samples_cuts_and_is_recorded() -> None:
    model = mlp()
    batches = batches_for(model, [4, 4, 4])
    names = select_parameters(model, "all")
    fisher = compute_fisher(model, iter(batches), names, estimator="per_sample", max_samples=6)
    expected = compute_fisher(model, [(batches[0][0], batches[0][1]), (batches[1][0][:2], batches[1][1][:2])],
                              names, estimator="per_sample")
    assert_close(fisher, expected)
    assert (fisher.info.max_samples, fisher.info.num_samples, fisher.info.num_batches) == (6, 6, 2)


def test_max_samples_does_not_pull_extra_batches() -> None:
    model = mlp()
    pulled = []

    def loader():
        for i, batch in enumerate(batches_for(model, [4, 4, 4])):
            pulled.append(i)
            yield batch

    compute_fisher(model, loader(), ["2.bias"], max_samples=4)
    assert pulled == [0]


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "exact"}, "estimator"),
    ({"max_samples": 0}, "max_samples"),
])
def test_compute_fisher_bad_arguments(kwargs: dict, match: str) -> None:
    model = mlp()
    with pytest.raises(ConfigError, match=match):
        compute_fisher(model, batches_for(model, [2]), ["2.bias"], **kwargs)


def test_compute_fisher_unknown_name() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="fc.weight"):
        compute_fisher(model, batches_for(model, [2]), ["fc.weight"])


def test_compute_fisher_no_data() -> None:
    with pytest.raises(FisherError, match="no samples"):
        compute_fisher(mlp(), [], ["2.bias"])


def test_compute_fisher_rejects_non_pairs() -> None:
    model = mlp()
    x, y = batches_for(model, [2])[0]
    with pytest.raises(ConfigError, match=r"\(x, y\)"):
        compute_fisher(model, [(x, y, y)], ["2.bias"])


# --------------------------------------------------------------------------------------------
# FisherAccumulator
# --------------------------------------------------------------------------------------------


def train_steps(model: nn.Module, batches, *, zero_grad: bool = True, lr: float = 0.0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        if zero_grad:
            opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("zero_grad", [True, False])
def test_accumulator_equals_batch_estimator(zero_grad: bool) -> None:
    model = cnn()
    batches = batches_for(model, [5, 3, 7])
    names = select_parameters(model, "all")
    with FisherAccumulator(model, names) as acc:
        train_steps(model, batches, zero_grad=zero_grad)
        assert acc.num_batches == 3
        assert_close(acc.result(), compute_fisher(model, batches, names, estimator="batch"))


def test_accumulator_ignores_autograd_grad_and_unselected() -> None:
    model = mlp()
    batches = batches_for(model, [4, 4])
    acc = FisherAccumulator(model, ["2.weight"])
    train_steps(model, batches)
    x, y = batches[0]
    torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert acc.num_batches == 2
    assert list(acc.result()) == ["2.weight"]
    assert_close(acc.result(), compute_fisher(model, batches, ["2.weight"]))
    acc.close()


def test_accumulator_result_is_a_copy_and_reset_clears() -> None:
    model = mlp()
    acc = FisherAccumulator(model, ["2.bias"])
    train_steps(model, batches_for(model, [4]))
    first = acc.result()
    kept = first["2.bias"].clone()
    train_steps(model, batches_for(model, [4], seed=1))
    assert torch.equal(first["2.bias"], kept)
    acc.reset()
    assert acc.num_batches == 0
    with pytest.raises(FisherError, match="no backward"):
        acc.result()
    acc.close()


def _hook_state(model: nn.Module) -> list:
    return [(bool(p._backward_hooks), bool(getattr(p, "_post_accumulate_grad_hooks", None)))
            for p in model.parameters()]


def test_accumulator_close_leaves_no_hooks() -> None:
    model = mlp()
    pristine = _hook_state(model)
    acc = FisherAccumulator(model, select_parameters(model, "all"))
    assert _hook_state(model) != pristine
    acc.close()
    acc.close()  # idempotent
    assert _hook_state(model) == pristine
    assert not any(k.startswith("_fl_unlearn") for k in vars(model))
    train_steps(model, batches_for(model, [4]))
    assert acc.num_batches == 0


def test_double_attach_raises_until_closed() -> None:
    model = mlp()
    acc = FisherAccumulator(model, ["2.bias"])
    with pytest.raises(ConfigError, match="already attached"):
        FisherAccumulator(model, ["0.bias"])
    acc.close()
    FisherAccumulator(model, ["0.bias"]).close()


def test_accumulator_rejects_frozen_and_per_sample_without_opacus() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="0.weight"):
        FisherAccumulator(model, ["0.weight"])
    with pytest.raises(ConfigError, match="GradSampleModule"):
        FisherAccumulator(model, ["2.weight"], estimator="per_sample")
    with pytest.raises(ConfigError, match="expected.*compute_fisher"):
        FisherAccumulator(model, ["2.weight"], estimator="expected")
    assert not hasattr(model, "_fl_unlearn_fisher_accumulator")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks, inputs without grad
@pytest.mark.parametrize("zero_grad", [True, False])
def test_per_sample_accumulator_with_opacus_equals_per_sample_estimator(zero_grad: bool) -> None:
    from opacus import GradSampleModule

    model = cnn()
    batches = batches_for(model, [5, 3, 7])
    names = select_parameters(model, "all")
    expected = compute_fisher(model, batches, names, estimator="per_sample")
    gsm = GradSampleModule(model)
    acc = FisherAccumulator(gsm, [f"_module.{n}" for n in names], estimator="per_sample")
    train_steps(gsm, batches, zero_grad=zero_grad)
    result = acc.result()
    assert (acc.num_batches, acc.num_samples, result.info.num_samples) == (3, 15, 15)
    assert_close({n.removeprefix("_module."): t for n, t in result.items()}, expected)
    acc.close()


def test_compute_fisher_rejects_opacus_wrapped_model() -> None:
    from opacus import GradSampleModule

    model = mlp()
    gsm = GradSampleModule(model)
    with pytest.raises(ConfigError, match="Opacus"):
        compute_fisher(gsm, batches_for(model, [2]), ["_module.2.bias"])


# --------------------------------------------------------------------------------------------
# check_fisher / validate_fisher
# --------------------------------------------------------------------------------------------


def test_check_fisher_accepts_a_computed_fisher() -> None:
    model = mlp()
    fisher = compute_fisher(model, batches_for(model, [3]), select_parameters(model, "all"))
    assert check_fisher(fisher, model) == []
    assert check_fisher(fisher, dict(model.state_dict())) == []
    assert fisher_num_elements(fisher) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, value, match", [
    ("fc.weight", torch.zeros(4, 8), "'fc.weight' is not a model parameter"),
    ("2.weight", torch.zeros(8, 4), r"'2.weight' has shape \(8, 4\)"),
    ("2.weight", torch.zeros(4, 8, dtype=torch.int64), "'2.weight' has dtype torch.int64"),
    ("2.bias", torch.tensor([0.0, float("nan"), 1.0, 0.0]), "'2.bias' has 1 NaN/inf"),
    ("2.bias", torch.tensor([0.0, float("inf"), 1.0, 0.0]), "'2.bias' has 1 NaN/inf"),
    ("2.bias", torch.tensor([0.0, -1e-9, 1.0, 0.0]), "'2.bias' has 1 negative"),
])
def test_check_fisher_finds_each_problem(name: str, value: torch.Tensor, match: str) -> None:
    problems = check_fisher({name: value}, mlp())
    assert len(problems) == 1 and isinstance(problems[0], FisherError)
    assert pytest.raises(FisherError, validate_fisher, {name: value}, mlp()).match(match)


def test_validate_fisher_lists_all_problems() -> None:
    bad = {"nope": torch.zeros(1), "2.bias": torch.tensor([-1.0, 0.0, 0.0, float("nan")])}
    with pytest.raises(FisherError, match=r"3 problem.*'nope'.*'2.bias' has 1 NaN.*'2.bias' has 1 negative"):
        validate_fisher(bad, mlp())


def test_per_sample_in_chunks_equals_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_unlearn.fisher as fisher_module

    model = cnn()
    names = select_parameters(model, "all")
    monkeypatch.setattr(fisher_module, "_VMAP_ELEMENTS", 2 * sum(p.numel() for p in model.parameters()))
    batches = batches_for(model, [7, 5])
    assert_close(compute_fisher(model, batches, names, estimator="per_sample"),
                 brute_per_sample(model, batches, names))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_accumulator_without_grad_sample_raises() -> None:
    from opacus import GradSampleModule

    model = mlp()
    gsm = GradSampleModule(model)
    gsm.disable_hooks()
    acc = FisherAccumulator(gsm, ["_module.2.bias"], estimator="per_sample")
    x, y = batches_for(model, [3])[0]
    with pytest.raises(FisherError, match="'_module.2.bias' has no grad_sample"):
        F.cross_entropy(gsm(x), y).backward()
    assert acc.num_batches == 0
    acc.close()
