"""The round engine against plain Hugging Face computations, on Llama, GPT-2 and Qwen2 configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCHS, BBQ_FIXTURE
from transformers import AutoModelForCausalLM

from workbench.engine.generation import generate_round, pad
from workbench.engine.protocol import Decoding
from workbench.engine.run import RunConfig, run_protocol
from workbench.engine.task import Sample, Task
from workbench.engine.tasks import BBQ


def reference_model(path):
    """An independent plain HF model (default attention implementation), loaded from the same folder."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, loaded):
    """arch → a finished 3-round bbq-paper run over the fixture (batch 3, so padding is exercised)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for arch in ARCHS:
        out[arch] = run_protocol(
            RunConfig(out=root / f"{arch}.h5", model=str(loaded(arch).path), task="bbq", data=(str(BBQ_FIXTURE),),
                      protocol="bbq-paper", rounds=3, batch_size=3, max_new_tokens=6, limit=5,
                      inject={3: "Now answer the question again, briefly."}),
            model=loaded(arch),
        )
    yield out
    for r in out.values():
        r.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_residuals_equal_hf_hidden_states(arch, runs, loaded):
    """Every round's last-prompt-token and response-mean residuals equal an independent HF forward
    over that round's prompt (the transcript up to it), layer by layer, to 1e-4 relative."""
    run = runs[arch]
    hf = reference_model(loaded(arch).path)
    acts = run.array("activations/hook_resid_post")  # [N, R, 2, L, d]
    transcripts = run.array("transcripts/token_ids")
    prompt_spans = run.array("rounds/prompt_span")
    response_spans = run.array("rounds/response_span")
    last_block = hf.model.layers[-1] if hasattr(hf, "model") else hf.transformer.h[-1]
    captured = {}
    handle = last_block.register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        for i in range(acts.shape[0]):
            for t in range(acts.shape[1]):
                end = prompt_spans[i, t, 1]
                r0, r1 = response_spans[i, t]
                ids = torch.tensor(transcripts[i][: max(end, r1)], dtype=torch.long)[None]
                with torch.no_grad():
                    hs = hf(ids, output_hidden_states=True).hidden_states
                layers = [h[0] for h in hs[1:-1]] + [captured["last"][0]]  # hs[-1] has the final norm applied
                for layer, h in enumerate(layers):
                    torch.testing.assert_close(torch.from_numpy(acts[i, t, 0, layer]), h[end - 1], rtol=1e-4, atol=1e-4)
                    if r1 > r0:
                        torch.testing.assert_close(torch.from_numpy(acts[i, t, 1, layer]), h[r0:r1].mean(0), rtol=1e-4, atol=1e-4)
                    else:
                        assert np.isnan(acts[i, t, 1, layer]).all()
    finally:
        handle.remove()


def recompute_greedy(hf, prompts, pad_id, n_new):
    """Greedy decoding with no KV cache: the whole sequence is re-run for every new token."""
    ids, mask = pad(prompts, pad_id, "cpu", "left")
    logits_per_step = []
    for _ in range(n_new):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]
        logits_per_step.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -n_new:], torch.stack(logits_per_step, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_recompute(arch, loaded):
    model = loaded(arch)
    tok = model.tokenizer
    prompts = [tok("Who was forgetful? The answer is")["input_ids"], tok("Review your previous answer.")["input_ids"][:4],
               tok("hello world")["input_ids"]]
    n_new = 8
    hf = model.hf
    eos = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None  # run all steps so every position is compared
    try:
        tok_eos = tok.eos_token
        out = generate_round(hf, _NoStop(tok), prompts, Decoding(max_new_tokens=n_new), "cpu")
    finally:
        hf.generation_config.eos_token_id = eos
        assert tok.eos_token == tok_eos
    want_ids, want_logits = recompute_greedy(reference_model(model.path), prompts, tok.pad_token_id, n_new)
    assert [r for r in out.response_ids] == want_ids.tolist()
    torch.testing.assert_close(out.step_logits, want_logits, rtol=1e-4, atol=1e-4)


class _NoStop:
    """The model's tokenizer with no EOS id, so generation runs every step (a view, not a mock)."""

    def __init__(self, tok):
        self._tok = tok

    eos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_input_is_the_chat_template_of_the_whole_history(arch, runs, loaded):
    """Round t's input decodes to the chat template over every earlier turn, each exactly once, and
    it is what generation saw: the first generated step's entropy equals a forward over it."""
    run = runs[arch]
    tok = loaded(arch).tokenizer
    hf = reference_model(loaded(arch).path)
    first_step_entropy = run.array("tokens/token_entropy")
    instructions = run.array("rounds/instruction")
    responses = run.array("rounds/response")
    transcripts = run.array("transcripts/token_ids")
    spans = run.array("rounds/prompt_span")
    protocol = run.meta["protocol"]
    prefixes = [protocol["first_prefix"]] + [protocol["followup_prefix"]] * (run.n_rounds - 1)
    for i in range(len(instructions)):
        for t in range(run.n_rounds):
            messages = []
            for s in range(t):
                messages += [{"role": "user", "content": instructions[i, s]}, {"role": "assistant", "content": prefixes[s] + responses[i, s]}]
            messages.append({"role": "user", "content": instructions[i, t]})
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefixes[t]
            model_input = tok.decode(transcripts[i][: spans[i, t, 1]])
            assert model_input == expected
            for s in range(t + 1):
                assert model_input.count(instructions[i, s]) == list(instructions[i, : t + 1]).count(instructions[i, s])
            assert model_input.count("<|im_start|>assistant") == t + 1
            with torch.no_grad():
                logits = hf(torch.tensor(transcripts[i][: spans[i, t, 1]])[None]).logits[0, -1]
            p = torch.softmax(logits.double(), -1)
            assert first_step_entropy[i, t][0] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)


def direct_option_probs(hf, prompt_ids, lead_ids, option_ids):
    """p̂(o) ∝ exp(−mean NLL of o's tokens after prompt+lead), each option in its own unpadded pass."""
    scores = []
    for opt in option_ids:
        ids = torch.tensor(prompt_ids + lead_ids + opt)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        start = len(prompt_ids) + len(lead_ids)
        nll = -torch.stack([logp[start + j - 1, opt[j]] for j in range(len(opt))]).mean()
        scores.append(-nll)
    return torch.softmax(torch.stack(scores), 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_option_probabilities_equal_direct_computation(arch, runs, loaded):
    run = runs[arch]
    model = loaded(arch)
    hf = reference_model(model.path)
    tok = model.tokenizer
    probs = run.array("rounds/option_probs")
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    options = run.array("samples/options")
    transcripts = run.array("transcripts/token_ids")
    spans = run.array("rounds/prompt_span")
    for i in range(2):
        sample = Sample(index=i, id="", context="", question="", options=tuple(options[i]))
        option_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in BBQ.option_continuations(sample)]
        for t in range(run.n_rounds):
            want = direct_option_probs(hf, list(transcripts[i][: spans[i, t, 1]]), [], option_ids)
            np.testing.assert_allclose(probs[i, t], want.numpy(), rtol=1e-4, atol=1e-5)
    entropy = run.array("rounds/option_entropy")
    hand = np.array([[-sum(p * np.log(p) for p in row) for row in per] for per in probs])
    np.testing.assert_allclose(entropy, hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("letters", [[" a", " b", " c"], [" a b", " c", " b a c"]], ids=["single-token", "multi-token"])
def test_options_after_a_lead_equal_direct_computation(letters, loaded):
    """The fast path (single tokens: the generation's own logits) and the shared-row pass (several
    options after one lead in one row) agree with a separate unpadded pass per option."""
    model = loaded("llama")
    tok = model.tokenizer
    lengths = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in letters]
    assert (max(lengths) == 1) == (letters[0] == " a")
    lead = 2
    task = Task(name="letters", multiple_choice=True, format_choices=BBQ.format_choices,
                option_continuations=lambda s: letters, parse_answer=lambda s, text: -1,
                lead_length=lambda ids, tokenizer: lead)
    from workbench.engine import tasks as tasks_module

    samples = tasks_module.load_bbq([BBQ_FIXTURE], limit=3)
    from workbench.engine.capture import hook_sites
    from workbench.engine.batch import run_batch
    from workbench.engine.protocol import load_protocol

    protocol = load_protocol("bbq-paper", rounds=2)
    res = run_batch(model, task, protocol, samples, hook_sites(model, ["hook_resid_post"], [0]), seed=0)
    hf = reference_model(model.path)
    option_ids = [tok(x, add_special_tokens=False)["input_ids"] for x in letters]
    for i in range(3):
        for t in range(2):
            prompt = res.transcripts[i][: res.prompt_spans[i, t, 1]]
            assert len(res.response_ids[i][t]) > lead
            want = direct_option_probs(hf, prompt, res.response_ids[i][t][:lead], option_ids)
            np.testing.assert_allclose(res.option_probs[i, t], want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("letters", [[" a", " b", " c"], [" a b", " c", " b a c"]], ids=["single-token", "multi-token"])
def test_a_sample_with_fewer_options_is_scored_over_its_own(letters, loaded):
    """Rows with 2 and 3 options in one batch: each row's probabilities are over its own options
    (NaN beyond them), as a separate pass per option computes them."""
    from workbench.engine import tasks as tasks_module
    from workbench.engine.capture import hook_sites
    from workbench.engine.batch import run_batch
    from workbench.engine.protocol import load_protocol

    model = loaded("llama")
    tok = model.tokenizer
    lead = 2
    own = lambda s: letters[: 2 if s.index % 2 else 3]  # noqa: E731
    task = Task(name="letters", multiple_choice=True, format_choices=BBQ.format_choices,
                option_continuations=own, parse_answer=lambda s, text: -1, lead_length=lambda ids, tokenizer: lead)
    samples = tasks_module.load_bbq([BBQ_FIXTURE], limit=3)
    assert sorted({len(own(s)) for s in samples}) == [2, 3]
    res = run_batch(model, task, load_protocol("bbq-paper", rounds=2), samples, hook_sites(model, ["hook_resid_post"], [0]), seed=0)
    hf = reference_model(model.path)
    for i, sample in enumerate(samples):
        option_ids = [tok(x, add_special_tokens=False)["input_ids"] for x in own(sample)]
        for t in range(2):
            prompt = res.transcripts[i][: res.prompt_spans[i, t, 1]]
            want = direct_option_probs(hf, prompt, res.response_ids[i][t][:lead], option_ids)
            np.testing.assert_allclose(res.option_probs[i, t, : len(option_ids)], want.numpy(), rtol=1e-4, atol=1e-5)
            assert np.isnan(res.option_probs[i, t, len(option_ids):]).all()


def test_single_token_options_are_read_off_the_step_logits():
    """The fast path of ``score_options``: each option's NLL is minus the log-softmax of the
    generation's own logits at the row's answer step, NaN beyond a row's options (and for a row
    with none)."""
    from workbench.engine.generation import RoundOutput, score_options

    logits = torch.randn(4, 6, 30, generator=torch.Generator().manual_seed(0))
    rnd = RoundOutput([[1, 2, 3, 4, 5]] * 4, [[0.0] * 6] * 4, logits, None, torch.ones(4, 2))
    options = [[[3], [4], [5]], [[7], [8]], [], [[9]]]
    leads = [2, 0, 1, 4]
    got = score_options(None, rnd, leads, options, pad_id=0)
    want = torch.full((4, 3), float("nan"))
    for i, opts in enumerate(options):
        for k, (token,) in enumerate(opts):
            want[i, k] = -torch.log_softmax(logits[i, leads[i]], -1)[token]
    torch.testing.assert_close(got, want, equal_nan=True)


def test_token_entropy_matches_hand_computation(runs, loaded):
    """Mean token entropy of a round equals the entropy of each generated step's distribution,
    recomputed by hand from a plain forward over the transcript."""
    run = runs["llama"]
    hf = reference_model(loaded("llama").path)
    transcripts = run.array("transcripts/token_ids")
    rspans = run.array("rounds/response_span")
    per_token = run.array("tokens/token_entropy")
    mean = run.array("rounds/mean_token_entropy")
    i, t = 0, 1
    r0, r1 = rspans[i, t]
    ids = torch.tensor(transcripts[i])[None]
    with torch.no_grad():
        p = torch.softmax(hf(ids).logits[0].double(), -1)
    hand = [float(-(p[j] * p[j].log()).sum()) for j in range(r0 - 1, r0 - 1 + len(per_token[i, t]))]
    np.testing.assert_allclose(per_token[i, t], hand, rtol=1e-4)
    assert mean[i, t] == pytest.approx(np.mean(per_token[i, t]), rel=1e-6)
