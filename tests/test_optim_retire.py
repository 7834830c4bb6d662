"""engine/optim_state.py's refusals around a layer swap (sparsify_, densify_): optimizers built after the swap,
while one built before still holds the replaced tensors or the swap dropped a gradient not stepped yet."""
import pytest
import torch

import sparsetrain
from conftest import assert_step_refused, assert_steps_as_dense_masked, masked_mlp


@pytest.mark.parametrize("by", ["sparsify_", "densify_"])
def test_a_backward_before_the_swap_is_refused_by_an_optimizer_built_after_it(by):
    """The swap drops the replaced layer's gradient (a backward before it, no step): an optimizer built after
    stepped every other layer with its gradient and that layer without its own, silently (no error, that
    layer unchanged). Its step is refused naming the layer and the dropped gradient, the model untouched;
    after a backward again it steps as the dense masked model's optimizer."""
    dense, mask, model, x = masked_mlp(20)
    if by == "densify_":
        sparsetrain.sparsify_(model, {"0": mask})
    model(x).pow(2).sum().backward()
    sparsetrain.densify_(model) if by == "densify_" else sparsetrain.sparsify_(model, {"0": mask})
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    assert_step_refused(opt, model.parameters(),
                        rf"SGD param_groups\[0\]\['params'\]\[\d\] is the \S+ of layer '0' as {by} made it, without "
                        rf"a gradient while other parameters have one: {by} dropped the gradient the replaced tensor "
                        rf"held .*run the backward again after it")
    for m, o in ((model, opt), (dense, ref)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
    assert_steps_as_dense_masked(opt, ref, model, dense, mask, x, by)


def test_an_optimizer_built_after_unfreezing_a_swapped_layer_trains_it_while_the_older_one_is_refused():
    """A frozen layer swapped (sparsify_) and unfrozen after; the optimizer built before still holds its old
    frozen tensors and the head, a second one built after holds the unfrozen layer. The second one's step is
    allowed and trains the layer as the dense masked model's optimizer does; the older one's stays refused
    (it does not hold the replacement), the head untouched."""
    dense, mask, model, x = masked_mlp(20)
    model[0].requires_grad_(False)
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsetrain.sparsify_(model, {"0": mask})
    model[0].requires_grad_(True)
    late, ref = torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(dense[0].parameters(), lr=0.1)
    model(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    assert_steps_as_dense_masked(late, ref, model, dense, mask, x)
    torch.testing.assert_close(model[0].bias, dense[0].bias)
    assert_step_refused(early, model[2].parameters(), r"replaced while frozen \(requires_grad=False\); its "
                                                      r"replacement requires grad now, and this optimizer does not hold it")


@pytest.mark.parametrize("by", ["sparsify_", "densify_"])
@pytest.mark.parametrize("then", ["set_to_none", "zeros"])
def test_gradient_accumulation_across_the_swap_is_refused(by, then):
    """backward(x1); swap; an optimizer built after; backward(x2): the other layers' gradients summed both batches,
    the swapped layer's only x2's (its x1 share dropped by the swap), and the step trained on that silently. It is
    refused naming the layer, the swap and what to do, the model untouched; zeroing the gradients after the swap
    (set to None or to zeros in place) and running both backwards again steps as the dense masked model."""
    dense, mask, model, x = masked_mlp(21)
    x2 = torch.randn_like(x)
    if by == "densify_":
        sparsetrain.sparsify_(model, {"0": mask})
    model(x).pow(2).sum().backward()
    sparsetrain.densify_(model) if by == "densify_" else sparsetrain.sparsify_(model, {"0": mask})
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    model(x2).pow(2).sum().backward()
    assert_step_refused(opt, model.parameters(),
                        rf"SGD param_groups\[0\]\['params'\]\[\d\] is the \S+ of layer '0' as {by} made it, whose "
                        rf"gradient comes from backwards after {by}, while parameter '2\.\w+' still holds its gradient "
                        rf"of a backward before {by}: .* step or zero_grad\(set_to_none=True\) before {by}, or run "
                        rf"both backwards after it")
    for m, o in ((model, opt), (dense, ref)):
        o.zero_grad(set_to_none=then == "set_to_none")
        m(x).pow(2).sum().backward()
        m(x2).pow(2).sum().backward()
    assert_steps_as_dense_masked(opt, ref, model, dense, mask, x, by)


def test_gradient_accumulation_across_filter_pruning_is_refused():
    """keep_channels_ replaces the layers it shrinks as sparsify_ does: the same refusal, then, after zero_grad and
    a backward, a plain SGD step (p - lr * grad) of every parameter."""
    from sparsetrain.prune import keep_channels_
    torch.manual_seed(22)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, x2 = torch.randn(4, 6), torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    keep_channels_(model, {"0": [0, 2, 4]})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x2).pow(2).sum().backward()
    assert_step_refused(opt, model.parameters(), r"is the weight of layer '0' as filter pruning \(keep_channels_\) "
                                                 r"made it, whose gradient comes from backwards after")
    opt.zero_grad()
    model(x2).pow(2).sum().backward()
    want = [(p - 0.1 * p.grad).detach() for p in model.parameters()]
    opt.step()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w)


def test_the_watch_on_the_other_gradients_does_not_block_a_later_swap_nor_warn_when_saved():
    """The refusal above watches the other layers' parameters (a tensor pre-hook of the engine's own until the first
    step): sparsify_ of such a layer is not refused as one with a user's gradient hook, and torch.save does not warn
    of an unsaved hook; the model then trains as the dense masked one."""
    import io
    import warnings
    dense, mask, model, x = masked_mlp(23)
    model(x).pow(2).sum().backward()
    sparsetrain.sparsify_(model, {"0": mask})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.save(model, io.BytesIO())
    full = torch.ones(3, 5, dtype=torch.bool)
    sparsetrain.sparsify_(model, {"2": full})
    assert type(model[2]).__name__ == "SparseLinear"
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    for m in (model, dense):
        m(x).pow(2).sum().backward()
    assert_steps_as_dense_masked(opt, ref, model, dense, mask, x)


def test_a_layer_frozen_after_its_backward_does_not_stop_the_swap():
    """A parameter frozen (requires_grad=False) while holding a gradient is not watched (no hook can sit on it): the
    swap goes through, and after zero_grad and a backward the model steps as the dense masked one."""
    dense, mask, model, x = masked_mlp(24)
    model(x).pow(2).sum().backward()
    for m in (model, dense):
        m[2].bias.requires_grad_(False)
    sparsetrain.sparsify_(model, {"0": mask})
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    for m, o in ((model, opt), (dense, ref)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
    assert_steps_as_dense_masked(opt, ref, model, dense, mask, x)
