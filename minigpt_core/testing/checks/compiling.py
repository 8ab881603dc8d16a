"""The compile check: torch.compile traces a component in one graph and does not recompile, or the component
declares not_compilable and train.compile refuses it."""

from __future__ import annotations


import torch
from torch import nn

from ...base.errors import SpecError
from ...spec import ExperimentSpec, resolve_components
from ...train.compile import compiled_graphs
from ..subject import MODULE_KINDS, Subject
from .registry import _aux_loss, _expect_close, _expected_shape, conformance_check


@conformance_check("compiles", "torch.compile(fullgraph=True) traces it with no graph break, matches eager "
                   "outputs and gradients, and recompiles neither at the next training step nor after an "
                   "eval-mode pass (as evaluation runs); or it declares not_compilable and train.compile "
                   "refuses it with that reason", MODULE_KINDS)
def check_compiles(s: Subject) -> None:
    if s.entry.not_compilable:
        _check_compile_refused(s)
        return
    # The "eager" backend runs dynamo's tracing and guards (where graph breaks and recompiles come
    # from) without inductor's code generation, which takes seconds even at these sizes.
    import torch._dynamo
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    module = s.build_module().train()
    eager = s.build_module().train()  # the same weights (same seed), never compiled
    x = s.inputs()
    w = torch.randn(_expected_shape(s, x), generator=torch.Generator().manual_seed(2)).to(s.device)

    def step(m: nn.Module, plain: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        plain.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True) if x.is_floating_point() else x
        y = m(inp)
        loss = (y * w).sum()
        aux = _aux_loss(plain)
        if loss.requires_grad:  # a fixed table of positions has nothing to differentiate
            (loss if aux is None else loss + aux).backward()
        grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        if inp.requires_grad:
            grads["<input>"] = inp.grad
        return y.detach(), grads

    torch._dynamo.reset()  # a fresh cache: other modules' graphs count against its size limit
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    try:
        try:
            got, grads = step(compiled, module)
        except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as exc:
            raise s.fail(f"torch.compile(fullgraph=True) cannot trace it in one graph: {_brief(exc)}. Fix the "
                         f"graph break, or declare not_compilable='<why>' when registering it") from None
        want, want_grads = step(eager, eager)
        _expect_close(s, got, want, "compiled output (training mode)")
        for name, g in want_grads.items():
            if name not in grads:
                raise s.fail(f"compiled, '{name}' gets no gradient")
            _expect_close(s, grads[name], g, f"compiled, the gradient of '{name}'")
        first = compiled_graphs()
        when = "at the second training step"
        # set_stance names the failed guard (torch >= 2.6); older versions have the config flag.
        no_recompiles = torch.compiler.set_stance("fail_on_recompile") if hasattr(torch.compiler, "set_stance") \
            else torch._dynamo.config.patch(error_on_recompile=True)
        with no_recompiles:
            try:
                step(compiled, module)
                when = "after an eval-mode pass (as the trainer's evaluation runs the plain module)"
                module.eval()
                with torch.no_grad():
                    module(x)
                module.train()
                step(compiled, module)
            except RuntimeError as exc:  # set_stance's "detected recompile" error names the failed guard
                raise s.fail(f"torch.compile recompiled {when}: {_brief(exc)}") from None
        if compiled_graphs() != first:
            raise s.fail(f"torch.compile compiled {compiled_graphs() - first} more graph(s) after the first step")
    finally:
        torch._dynamo.reset()


def _brief(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _check_compile_refused(s: Subject) -> None:
    """A component declaring not_compilable: a spec with train.compile = true is refused, with its reason."""
    spec = ExperimentSpec(model=s.model_spec(), train={"compile": True})
    try:
        resolve_components(spec, s.registry, entries={(s.entry.kind, s.entry.name): s.entry}, for_lm=False)
    except SpecError as exc:
        if s.entry.not_compilable in str(exc):
            return
        raise s.fail(f"declares not_compilable, but train.compile = true is refused for another reason: {exc}")
    raise s.fail("declares not_compilable, but a spec with train.compile = true using it is accepted")
