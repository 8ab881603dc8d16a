"""The lm_eval model type ``minigpt`` (minigpt_core.downstream.adapter) equals minigpt's own model.

Real lm_eval requests (``Instance``) through the real adapter, against minigpt's own forward pass,
loss and ``minigpt sample``; for the three kinds of tokenizer (char, GPT-2's BPE, a trained BPE).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from minigpt_core.assembly import load_model, quantize_checkpoint  # noqa: E402
from minigpt_core.checkpoints.checkpoint import save_model  # noqa: E402
from minigpt_core.downstream.adapter import AdapterError, MinigptLM  # noqa: E402
from minigpt_core.model.build import build_model  # noqa: E402
from minigpt_core.model.tokenizers import build_tokenizer  # noqa: E402
from minigpt_core.spec import parse_spec  # noqa: E402
from minigpt_core.tasks.evaluate import lm_loss  # noqa: E402
from minigpt_core.train.trainer import train  # noqa: E402
from training_utils import cli, corpus_text, tiny_spec_data  # noqa: E402

TOL = 1e-4
CONTEXT = 32
TEXT = ("The class statement creates a class object. A class definition is an executable statement; the "
        "inheritance list usually gives a list of base classes, so each class in the list must evaluate to a "
        "class object which allows subclassing.")  # 214 characters: several windows of 32 tokens
TOKENIZERS = {"char": {"name": "char"}, "gpt2": {"name": "gpt2"}, "bpe": {"name": "bpe", "params": {"vocab_size": 300}}}


def _fresh(name: str, seed: int = 3):
    vocab = {"char": 128, "gpt2": 50257, "bpe": 300}[name]
    spec = parse_spec({"seed": seed, "tokenizer": TOKENIZERS[name],
                       "model": {"vocab_size": vocab, "context_length": CONTEXT, "emb_dim": 32, "n_heads": 2,
                                 "n_layers": 2, "drop_rate": 0.0, "init": {"name": "gpt2.normal",
                                                                            "params": {"std": 0.2}}}})
    tokenizer = build_tokenizer(spec, training_text=corpus_text())
    torch.manual_seed(seed)
    return build_model(spec).eval(), tokenizer


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def fresh(request):
    model, tokenizer = _fresh(request.param)
    return model, tokenizer, MinigptLM.from_model(model, tokenizer, device="cpu", batch_size=3, progress=False)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def _direct(model, ids: list[int], n_cont: int) -> float:
    """log p(last n_cont of ids | the rest): one forward pass of the model, the logits read by hand."""
    inp = torch.tensor([ids[:-1]])
    logp = torch.log_softmax(model(inp)[0].double(), dim=-1)
    return float(sum(logp[len(ids) - 2 - j, ids[len(ids) - 1 - j]] for j in range(n_cont)))


# -- loglikelihood_rolling -------------------------------------------------------------------------
def test_rolling_loglikelihood_equals_minigpts_summed_token_losses(fresh):
    model, tokenizer, lm = fresh
    ids = tokenizer.encode(TEXT)
    assert len(ids) > CONTEXT  # several windows
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(TEXT,)]))
    # minigpt's own loss (GPT.forward with targets: its mean cross-entropy) on lm_eval's windows of the same tokens
    total = 0.0
    with torch.no_grad():
        for inp, pred in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, CONTEXT, 1)):
            window = inp + pred  # inputs and the tokens predicted; the last len(pred) are scored
            x, y = torch.tensor([window[:-1]]), torch.tensor([window[1:]])
            logits = model(x)[:, -len(pred):]
            total -= float(lm_loss(logits, y[:, -len(pred):], reduction="sum"))
    assert got[0] == pytest.approx(total, abs=TOL)
    # a text of one window: minus the model's mean loss times the tokens, from its own forward(targets=...)
    short = tokenizer.decode(ids[:CONTEXT])
    one = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,)]))[0]
    window = [lm.prefix_token_id] + tokenizer.encode(short)
    with torch.no_grad():
        loss = model(torch.tensor([window[:-1]]), targets=torch.tensor([window[1:]]))
    assert one == pytest.approx(-float(loss) * (len(window) - 1), abs=TOL)


# -- loglikelihood ---------------------------------------------------------------------------------
def test_loglikelihood_equals_a_direct_forward_pass(fresh):
    model, tokenizer, lm = fresh
    pairs = [("The class statement", " creates a class object."), ("A list", " of base classes"),
             ("", "Empty: the prefix token."), ("Trailing space moves ", "to the continuation"),
             (TEXT, " and the end")]  # the last one is longer than the context: cut on the left
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):
        if context:
            n_space = len(context) - len(context.rstrip())
            context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
            assert n_space == 0 or continuation.startswith(" ")
            whole = tokenizer.encode(context + continuation)
            n = len(whole) - len(tokenizer.encode(context))
        else:
            whole = [lm.prefix_token_id] + tokenizer.encode(continuation)
            n = len(whole) - 1
        want = _direct(model, whole[-(CONTEXT + 1):], n)
        assert logprob == pytest.approx(want, abs=TOL), (context, continuation)


def test_batching_and_order_change_nothing_and_is_greedy_is_the_greedy_continuation(fresh):
    model, tokenizer, _ = fresh
    contexts = ["The class", "A list of base classes", "x", "Each class must"]
    pairs, stable = [], []
    for c in contexts:  # the model's own greedy continuation, and a different one
        ids = tokenizer.encode(c)
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1, :tokenizer.n_vocab].argmax())
        cont = tokenizer.decode(ids + [nxt])[len(c):]
        pairs += [(c, cont), (c, " zebra")]
        stable.append(tokenizer.encode(c + cont) == ids + [nxt])  # a BPE may merge across the boundary
    one = MinigptLM.from_model(model, tokenizer, device="cpu", batch_size=1, progress=False)
    many = MinigptLM.from_model(model, tokenizer, device="cpu", batch_size=8, progress=False)
    a = one.loglikelihood(_requests("loglikelihood", pairs))
    b = many.loglikelihood(_requests("loglikelihood", pairs[::-1]))[::-1]
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ga == gb
    greedy = [g for (_, g) in a]
    assert sum(stable) >= 2 and all(g for g, ok in zip(greedy[0::2], stable) if ok)  # the argmax token is greedy
    assert not any(greedy[1::2])  # " zebra" is not


def test_a_continuation_longer_than_the_context_is_scored_in_pieces(fresh):
    model, tokenizer, lm = fresh
    context, continuation = "Classes:", " " + TEXT
    (logprob, _), = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    assert len(whole) - start > CONTEXT
    half = CONTEXT // 2
    want = sum(_direct(model, whole[:a + half][-(CONTEXT + 1):], len(whole[a:a + half]))
               for a in range(start, len(whole), half))
    assert math.isfinite(logprob) and logprob == pytest.approx(want, abs=TOL)


def test_bad_model_arguments_are_one_clear_message(fresh):
    with pytest.raises(AdapterError, match="does not take pretrained"):
        MinigptLM(checkpoint="x", pretrained="gpt2")
    with pytest.raises(AdapterError, match="needs a checkpoint"):
        MinigptLM()
    with pytest.raises(AdapterError, match="No checkpoint at /nowhere"):
        MinigptLM(checkpoint="/nowhere")
    model, tokenizer, _ = fresh
    with pytest.raises(AdapterError, match="batch_size"):
        MinigptLM.from_model(model, tokenizer, batch_size="zero")


def test_a_character_outside_a_char_vocabulary_is_named(fresh):
    model, tokenizer, lm = fresh
    if tokenizer.name != "char":
        pytest.skip("byte-level tokenizers encode every character")
    with pytest.raises(AdapterError, match="cannot be encoded with the checkpoint's char tokenizer"):
        lm.loglikelihood(_requests("loglikelihood", [("a", " ☃")]))


# -- checkpoints: a trained run, int8, a LoRA adapter ------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint of the char model above, with its tokenizer: peaked logits (init std 0.2), so greedy
    decoding varies from token to token (a briefly trained tiny model only repeats spaces)."""
    tmp = tmp_path_factory.mktemp("adapter-run")
    model, tokenizer = _fresh("char", seed=5)
    spec = parse_spec({"seed": 5, "tokenizer": TOKENIZERS["char"], "model": model.spec.model_dump(mode="json")})
    ckpt = save_model(model, spec, tmp / "ckpt", meta={"tokenizer": tokenizer.state()})
    return tmp, ckpt


def _greedy(lm, context: str, n: int, until: list[str] | None = None) -> str:
    kwargs = {"until": until or [], "max_gen_toks": n, "do_sample": False}
    return lm.generate_until(_requests("generate_until", [(context, kwargs)]))[0]


@pytest.mark.parametrize("prompt,n", [("The ", 20), ("A class", 48)])  # 48 > the context: a sliding window
def test_generate_until_greedy_equals_minigpt_sample_at_temperature_0(run, capsys, prompt, n):
    _, ckpt = run
    status, out, err = cli(capsys, "sample", ckpt, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", n)
    assert status == 0, err
    sampled = out.rstrip("\n")
    assert sampled.startswith(prompt) and len(set(sampled[len(prompt):])) > 5  # not a run of one character
    lm = MinigptLM(checkpoint=str(ckpt), device="cpu", progress=False)
    assert prompt + _greedy(lm, prompt, n) == sampled


def test_generate_until_stops_at_the_until_strings(run):
    _, ckpt = run
    lm = MinigptLM(checkpoint=str(ckpt), device="cpu", progress=False)
    free = _greedy(lm, "The ", 30)
    stop = free[12:14]
    assert len(free) == 30 and len(set(free)) > 5 and free.index(stop) >= 1
    calls = []
    hook = lm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cut = _greedy(lm, "The ", 30, until=[stop, "never appears \x00"])
    finally:
        hook.remove()
    assert cut == free[:free.index(stop)]
    assert len(calls) < 30  # generation stopped once the stop string appeared, not after 30 tokens
    # several contexts of different lengths in one call: each as if alone, in the order asked
    contexts = ["The ", "A class", "The ", "Each"]
    batch = lm.generate_until(_requests("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 12})
                                                           for c in contexts]))
    assert batch == [_greedy(lm, c, 12, until=["\n"]) for c in contexts]


def test_int8_and_adapter_checkpoints_load_as_sample_loads_them(run, tmp_path):
    tmp, ckpt = run
    text = [("The class", " creates objects.")]
    int8 = quantize_checkpoint(ckpt, tmp_path / "int8", "int8-dynamic")[0]
    lm8 = MinigptLM(checkpoint=str(int8), progress=False)
    assert lm8.device.type == "cpu" and type(lm8.model.trf_blocks[0].att.W_query) is not torch.nn.Linear
    model8, _ = load_model(int8, quantized=True)
    tokenizer = lm8.tok
    whole = tokenizer.encode("The class creates objects.")
    n = len(whole) - len(tokenizer.encode("The class"))
    assert lm8.loglikelihood(_requests("loglikelihood", text))[0][0] == pytest.approx(
        _direct(model8.eval(), whole, n), abs=TOL)
    # a LoRA fine-tune of the run: its checkpoint holds only the adapter; the adapter loads merged
    spec = parse_spec(tiny_spec_data(tmp_path, name="lora", init_from=str(ckpt),
                                     finetune={"adapter": {"name": "book.lora", "params": {"rank": 2, "alpha": 4.0}}},
                                     train={"max_steps": 4, "save_every": 4, "eval_every": 4, "lr": 3e-2}))
    lora = train(spec, progress=False).checkpoint
    lm_lora = MinigptLM(checkpoint=str(lora), device="cpu", progress=False)
    assert type(lm_lora.model.trf_blocks[0].att.W_query) is torch.nn.Linear  # merged into plain weights
    merged, _ = load_model(lora)
    got = lm_lora.loglikelihood(_requests("loglikelihood", text))[0][0]
    assert got == pytest.approx(_direct(merged.eval(), whole, n), abs=TOL)
    base = MinigptLM(checkpoint=str(ckpt), device="cpu", progress=False)
    assert abs(got - base.loglikelihood(_requests("loglikelihood", text))[0][0]) > 1e-3  # the adapter counts


def test_generation_arguments_are_read_as_lm_evals_hf_model_reads_them():
    from minigpt_core.downstream.adapter import _cut, _generation_options

    o = _generation_options({"until": "\n\n", "max_gen_toks": 7}, 256, "<|endoftext|>")
    assert o["until"] == ["\n\n", "<|endoftext|>"] and o["max_gen_toks"] == 7 and not o["sample"]
    assert o["temperature"] == 0.0  # greedy
    o = _generation_options({"max_new_tokens": 5, "do_sample": True}, 256, None)
    assert o["max_gen_toks"] == 5 and o["sample"] and o["temperature"] == 1.0 and o["until"] == []
    o = _generation_options({"temperature": 0.7, "top_k": 5}, 256, None)
    assert o["sample"] and o["temperature"] == 0.7 and o["top_k"] == 5 and o["max_gen_toks"] == 256
    assert not _generation_options({"do_sample": False, "temperature": 0.7}, 9, None)["sample"]
    assert _cut("abc. def\n\nghi", ["\n\n", "."]) == "abc"
    with pytest.raises(AdapterError, match="until"):
        _generation_options({"until": [3]}, 9, None)
