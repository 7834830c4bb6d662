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
