"""Checks of fine-tuning adapters and instruction templates."""

from __future__ import annotations


import torch
from torch import nn

from ...model.gpt import BuildContext
from ...model.trainable import is_marked_trainable
from ..subject import Subject
from .registry import _expect_close, conformance_check


# -- adapters --------------------------------------------------------------------------------
def _adapted_gpt(s: Subject) -> tuple[nn.Module, object, torch.Tensor]:
    """A tiny GPT (untied head), the adapter built for it, and a batch of token ids."""
    model = s.tiny_gpt(seed=0).eval()
    adapter = s.entry.factory(BuildContext(model.spec, s.components(model.spec)), s.validated_params())
    idx = torch.randint(0, model.spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5)).to(s.device)
    return model, adapter, idx


@conformance_check("adapter_identity", "applied to a model, the freshly initialised adapter leaves its logits "
                   "unchanged", {"adapter"})
def check_adapter_identity(s: Subject) -> None:
    model, adapter, idx = _adapted_gpt(s)
    with torch.no_grad():
        before = model(idx)
        names = adapter.apply(model)
        after = model(idx)
    if not names:
        raise s.fail("apply() adapted no module with the default params")
    _expect_close(s, after, before, "logits after apply() at initialisation", atol=1e-6)


@conformance_check("adapter_trainable", "apply() adds parameter_count(model) parameters, all tagged trainable, "
                   "and leaves the base parameters as they were", {"adapter"})
def check_adapter_trainable(s: Subject) -> None:
    model, adapter, _ = _adapted_gpt(s)
    expected = adapter.parameter_count(model)
    base = {id(p) for p in model.parameters()}
    n_base = sum(p.numel() for p in model.parameters())
    adapter.apply(model)
    if sum(p.numel() for p in model.parameters() if id(p) in base) != n_base:
        raise s.fail("apply() removed or replaced base parameters")
    tagged = {id(p) for m in model.modules() if is_marked_trainable(m) for p in m.parameters()}
    added = [p for p in model.parameters() if id(p) not in base]
    if sum(p.numel() for p in added) != expected:
        raise s.fail(f"apply() added {sum(p.numel() for p in added):,} parameters; parameter_count() said {expected:,}")
    if any(id(p) not in tagged for p in added):
        raise s.fail("some adapter parameters are not in a module tagged with mark_trainable(), so a frozen base "
                     "would freeze them too")


@conformance_check("adapter_merge", "merge() gives the unmerged output (<= 1e-5), unmerge() restores the base "
                   "weights, unload() leaves the base model's keys with the merged output", {"adapter"})
def check_adapter_merge(s: Subject) -> None:
    model, adapter, idx = _adapted_gpt(s)
    base_keys = set(model.state_dict())
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapter.apply(model)
    added = [p for n, p in model.named_parameters() if n not in base_keys]
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in added:  # a trained adapter: non-zero everywhere
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.1)
        unmerged = model(idx)
        adapter.merge(model)
        merged = model(idx)
        _expect_close(s, merged, unmerged, "logits after merge()")
        adapter.unmerge(model)
        state = model.state_dict()
        base_now = {k: state[k] for k in base_keys if k in state}
        if len(base_now) == len(base_keys):  # the base weights kept their keys (else compared through unload)
            for k, v in base_now.items():
                _expect_close(s, v, base_weights[k], f"{k} after merge() then unmerge()")
        _expect_close(s, model(idx), unmerged, "logits after merge() then unmerge()")
        adapter.unload(model)
        if set(model.state_dict()) != base_keys:
            raise s.fail(f"after unload() the state dict keys differ from the base model's "
                         f"({sorted(set(model.state_dict()) ^ base_keys)[:4]})")
        _expect_close(s, model(idx), unmerged, "logits after unload()")


# -- templates -------------------------------------------------------------------------------
@conformance_check("template_format", "the training text is text(prompt, '') + output, starting with the prompt, "
                   "for examples with and without an input", {"template"})
def check_template_format(s: Subject) -> None:
    template = s.entry.factory(None, s.validated_params())
    for instruction, input_, output in (("Name a colour.", "", "Blue."), ("Spell it.", "Ocassion", "Occasion")):
        prompt = template.prompt(instruction, input_)
        if not isinstance(prompt, str) or instruction not in prompt or input_ not in prompt:
            raise s.fail(f"prompt({instruction!r}, {input_!r}) = {prompt!r} does not hold the instruction and input")
        text, start = template.text(prompt, output), template.text(prompt, "")
        if not start.startswith(prompt):
            raise s.fail(f"text(prompt, '') = {start!r} does not start with the prompt {prompt!r}")
        if text != start + output:
            raise s.fail(f"text(prompt, {output!r}) = {text!r} is not text(prompt, '') + output = "
                         f"{start + output!r}: `minigpt sample --instruction` feeds text(prompt, '') and reads "
                         f"what follows as the response")
