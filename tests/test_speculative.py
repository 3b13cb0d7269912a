"""Speculative decoding (chatglm/runtime/speculative.py) on tiny random GGUFs: prompt lookup and draft models give
exactly the tokens plain decoding gives (greedy, and seeded sampling), the cache holds exactly ``Engine.tokens``
after every reply, and a draft model with another vocabulary is refused in one line before anything native runs.
These tests fix the draft length (adaptive=False); the adaptive controller, the default, is tested in
test_speculative_adapt.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chatglm.errors import InputError, UnsupportedModelError
from chatglm.runtime.generation import drain
from chatglm.runtime.model import load
from chatglm.runtime.sampling import SamplingParams
from chatglm.runtime.speculative import LookupDrafter, SpeculativeConfig

from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)
from hostile import cli

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
SETTINGS = dict(n_ctx=256, n_threads=1, kv_type="f32", flash_attn=False)


# ----------------------------------------------------------------------------------------------- prompt lookup
def test_lookup_drafts_what_followed_the_last_ngram():
    d = LookupDrafter()
    history = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert d.draft(history, 3) == [8, 9, 1]  # the 3-gram 5 6 7 occurred before, followed by 8 9 1
    assert d.draft(history, 10) == [8, 9, 1, 2, 5, 6, 7]  # no further than the history goes
    assert d.draft(history + [8], 2) == [9, 1]  # the index grows with the history
    assert d.draft([1, 2, 3, 4], 4) == []  # a new history (no earlier n-gram): nothing
    assert d.draft([4, 4, 4], 2) == [4]  # the latest earlier occurrence: 4 4 at 0..1, followed by one 4


def test_lookup_prefers_the_longest_ngram():
    d = LookupDrafter()
    # "2 3" was last followed by 9, but "1 2 3" (longer) by 4
    assert d.draft([1, 2, 3, 4, 0, 2, 3, 9, 1, 2, 3], 1) == [4]


def test_config_is_checked():
    with pytest.raises(InputError, match="lookup must be an integer between 0 and 64"):
        SpeculativeConfig(lookup=65)
    with pytest.raises(InputError, match="draft_max"):
        SpeculativeConfig(lookup=1, draft_max=-1)
    assert not SpeculativeConfig().enabled and SpeculativeConfig(lookup=3).n_max == 3


# ----------------------------------------------------------------------------------------------- helpers
def repetitive_prompt(m) -> list[int]:
    """A prompt whose text repeats, so that lookup finds n-grams (in the prompt, and in the loops random models fall
    into)."""
    text = "def add(a, b):\n    return a + b\n\n" * 4 + "你好, world! 今天天气很好。" * 3
    return m.format.completion_ids(text, m.engine)


def opts(spec) -> dict:
    return spec.options() if spec is not None else {}


def generate(m, ids, params=GREEDY):
    gen = drain(m.run(list(ids), params))
    return gen.tokens, gen.stats


def cache_matches(m) -> bool:
    """The KV cache holds exactly the engine's tokens (no rejected draft left behind)."""
    from chatglm.runtime import llama_native as native

    eng = m.engine
    pos_max = native.lib().llama_memory_seq_pos_max(eng._mem, 0)
    return pos_max + 1 == eng.n_prefix + len(eng.tokens)


def same_output(path, spec: SpeculativeConfig, params=GREEDY, rounds=2):
    """Tokens without and with speculation, over ``rounds`` generations that reuse the cache."""
    with load(path, **SETTINGS) as plain:
        ids = repetitive_prompt(plain)
        want = [generate(plain, ids + [0] * r, params)[0] for r in range(rounds)]
    with load(path, **opts(spec), **SETTINGS) as m:
        got, stats = [], []
        for r in range(rounds):
            tokens, s = generate(m, ids + [0] * r, params)
            got.append(tokens)
            stats.append(s)
            assert cache_matches(m)
    return want, got, stats


# ----------------------------------------------------------------------------------------------- greedy identity
def test_lookup_greedy_identical_chatglm3(glm3_gguf):
    want, got, stats = same_output(glm3_gguf, SpeculativeConfig(lookup=6, adaptive=False))
    assert got == want
    s = stats[0]
    assert s.verifications > 0
    assert 0 < s.accepted_tokens < s.drafted_tokens  # both paths: drafts accepted and drafts rejected


@pytest.fixture(scope="module")
def glm4_ggufs(tmp_path_factory):
    """GLM-4-9B (THUDM layout, ``chatglm`` arch) and GLM-4-0414 (``glm4`` arch) f32 GGUFs, and a second GLM-4-0414
    of another seed (the same vocabulary: a draft model that disagrees)."""
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4 import build_checkpoint, train_glm4_bpe

    root = tmp_path_factory.mktemp("spec-glm4")
    tok = train_glm4_bpe()
    out = {}
    for name, layout, seed in (("glm4", "glm4", 0), ("glm4-0414", "glm4-0414", 1), ("other", "glm4-0414", 2)):
        _, folder = build_checkpoint(layout, root / name, tok, seed=seed)
        out[name] = convert(folder, root / f"{name}.gguf", "f32").path
    return out


@pytest.mark.parametrize("name", ["glm4", "glm4-0414"])
def test_lookup_greedy_identical_glm4(name, glm4_ggufs):
    want, got, stats = same_output(glm4_ggufs[name], SpeculativeConfig(lookup=8, adaptive=False))
    assert got == want
    assert all(0 < s.accepted_tokens < s.drafted_tokens for s in stats)


def test_draft_model_itself_accepts_everything(glm4_ggufs):
    """The model drafting for itself: every greedy draft is the model's own choice, so all are accepted."""
    path = glm4_ggufs["glm4-0414"]
    want, got, stats = same_output(path, SpeculativeConfig(draft=path, draft_max=4, adaptive=False))
    assert got == want
    s = stats[0]
    assert s.drafted_tokens >= 20 and s.accepted_tokens == s.drafted_tokens


def test_disagreeing_draft_model_changes_nothing(glm4_ggufs):
    """Another model's drafts are mostly rejected: the output is still the target's."""
    want, got, stats = same_output(glm4_ggufs["glm4-0414"], SpeculativeConfig(draft=glm4_ggufs["other"], draft_max=3, adaptive=False))
    assert got == want
    assert stats[0].accepted_tokens < stats[0].drafted_tokens


def test_lookup_and_draft_model_together(glm4_ggufs):
    path = glm4_ggufs["glm4-0414"]
    want, got, _ = same_output(path, SpeculativeConfig(lookup=5, draft=glm4_ggufs["other"], draft_max=2, adaptive=False))
    assert got == want


def test_seeded_sampling_identical(glm4_ggufs):
    """One draw per token, in order, from the same logits: a seeded sampled reply is the same with speculation."""
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7, repeat_penalty=1.1, max_tokens=40)
    path = glm4_ggufs["glm4-0414"]
    want, got, stats = same_output(path, SpeculativeConfig(draft=path, draft_max=4, adaptive=False), params)
    assert got == want
    assert stats[0].drafted_tokens > 0


def test_chat_session_and_stats_line(glm4_ggufs, capsys):
    """A multi-turn chat reuses the cache across rejected drafts; the stats line shows the acceptance."""
    from chatglm.cli.chatout import print_stats

    path = glm4_ggufs["glm4"]
    replies = []
    for spec in (None, SpeculativeConfig(lookup=4, adaptive=False)):
        with load(path, **opts(spec), **SETTINGS) as m:
            s = m.session(temperature=0, max_tokens=24)
            replies.append([s.chat("hello hello hello"), s.chat("again: hello hello")])
            assert cache_matches(m)
            print_stats(m)
    assert [r.content for r in replies[0]] == [r.content for r in replies[1]]
    err = capsys.readouterr().err.splitlines()
    assert "drafts" not in err[0] and "lookup drafts" in err[1] or "nothing drafted" in err[1]


def test_max_tokens_and_stop_respected(glm4_ggufs):
    path = glm4_ggufs["glm4-0414"]
    with load(path, draft=path, draft_max=8, adaptive=False, **SETTINGS) as m:
        ids = repetitive_prompt(m)
        for n in (0, 1, 2, 5):
            tokens, stats = generate(m, ids, SamplingParams(temperature=0, max_tokens=n))
            assert len(tokens) == n and stats.finish_reason == "length"
            assert cache_matches(m)


def test_cancel_stops(glm4_ggufs):
    path = glm4_ggufs["glm4-0414"]
    with load(path, lookup=4, adaptive=False, **SETTINGS) as m:
        cancel = threading.Event()
        stream = m.run(repetitive_prompt(m), GREEDY, cancel)
        next(stream)
        cancel.set()
        gen = drain(stream)
        assert gen.stats.finish_reason == "cancelled"
        assert cache_matches(m)


# ----------------------------------------------------------------------------------------------- refusals
def test_other_vocabulary_refused_before_loading(glm3_gguf, glm4_ggufs, monkeypatch):
    import chatglm.runtime.model as model_module

    def no_native(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(model_module, "open_engine", no_native)
    with pytest.raises(InputError, match="cannot draft for .*vocabulary has .* tokens") as err:
        load(glm4_ggufs["glm4"], draft=glm3_gguf, **SETTINGS)
    assert glm3_gguf.name in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_other_vocabulary(glm3_gguf, glm4_ggufs):
    r = cli(["run", str(glm4_ggufs["glm4"]), "--draft", str(glm3_gguf), "-p", "hi", "-n", "2"])
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot draft for" in lines[0]


def test_cli_lookup_json(glm4_ggufs):
    import json

    r = cli(["run", str(glm4_ggufs["glm4"]), "--lookup", "4", "--temp", "0", "-n", "16", "--json", "-c", "256",
             "-p", "hello hello hello hello"])
    assert r.code == 0, r.err
    spec = json.loads(r.out)["speculative"]
    assert spec["drafter"] == "lookup" and 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]


def test_cli_range(glm4_ggufs):
    r = cli(["run", str(glm4_ggufs["glm4"]), "--lookup", "65", "-p", "hi"])
    assert r.code == 2 and "--lookup" in r.err and "between 0 and 64" in r.err


# ----------------------------------------------------------------------------------------------- recurrent state
@pytest.fixture(scope="module")
def glm5_next_gguf(tmp_path_factory):
    """A tiny GLM-5.3-Flash (linear-attention layers beside latent attention: a hybrid recurrent state), f32."""
    from chatglm.convert.pipeline import convert
    from chatglm.devtools import glm5_next
    from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, train_glm4_bpe
    from chatglm.devtools.glm_vision import IMAGE_SPECIALS

    root = tmp_path_factory.mktemp("spec-glm5")
    tok = train_glm4_bpe(vocab_size=400, specials=GLM4_SPECIALS + GLM45_EXTRA_SPECIALS + IMAGE_SPECIALS)
    model = glm5_next.tiny_model(tok.get_vocab_size() + 7)
    ckpt = glm5_next.save_checkpoint(model, root / "ckpt", tok, nextn=False)
    return convert(ckpt, root / "glm5-next.gguf", "f32").path


class ScriptedDrafter:
    """Drafts the known reply with its ``wrong``-th drafted token changed: every verification accepts some drafts
    and rejects the rest (so the cache rolls back each time)."""

    name = "scripted"

    def __init__(self, prompt_len: int, reply: list[int], wrong: int):
        self.prompt_len, self.reply, self.wrong = prompt_len, reply, wrong

    def draft(self, history, n):
        start = len(history) - self.prompt_len
        guess = list(self.reply[start:start + n])
        if len(guess) > self.wrong:
            guess[self.wrong] = (guess[self.wrong] + 1) % 300
        return guess

    def close(self):
        pass


@pytest.mark.parametrize("wrong", [0, 2])
def test_recurrent_state_rolls_back(glm5_next_gguf, wrong):
    """glm5-next's linear-attention state cannot drop cells; llama.cpp keeps snapshots of its last n states
    (n_rs_seq) when asked, and rejected drafts roll back to one of them: the output is plain decoding's."""
    with load(glm5_next_gguf, **SETTINGS) as plain:
        ids = repetitive_prompt(plain)
        want = generate(plain, ids)[0]
    with load(glm5_next_gguf, lookup=6, **SETTINGS) as m:
        assert m.engine.rollback_window == 6
        m.drafter = ScriptedDrafter(len(ids), want, wrong)
        got, s = generate(m, ids)
        assert got == want
        assert s.accepted_tokens == wrong * s.verifications and s.drafted_tokens > s.accepted_tokens
        assert cache_matches(m)
        again, _ = generate(m, ids)  # the next prompt rolls the state back or starts over: the same reply
        assert again == want


def test_recurrent_without_snapshots_refused(glm5_next_gguf, monkeypatch):
    """Were the snapshots not kept (a context made without them), speculation is refused in one line."""
    from chatglm.runtime import llama_engine

    monkeypatch.setattr(llama_engine.LlamaEngine, "rollback_window", property(lambda self: 0))
    with pytest.raises(UnsupportedModelError, match="recurrent .* roll back 0 tokens, fewer than the 6"):
        load(glm5_next_gguf, lookup=6, **SETTINGS)


# ----------------------------------------------------------------------------------------------- MTP (NextN)
@pytest.fixture(scope="module")
def glm45(tmp_path_factory):
    """A tiny GLM-4.5 (glm4moe) with its MTP layer (random, like the rest): (transformers model, f32 GGUF)."""
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4 import build_checkpoint, train_glm4_bpe

    root = tmp_path_factory.mktemp("spec-glm45")
    model, folder = build_checkpoint("glm45", root / "ckpt", train_glm4_bpe())
    return model, convert(folder, root / "glm45.gguf", "f32").path


@pytest.fixture(scope="module")
def glm45_gguf(glm45):
    return glm45[1]


def mtp_reference(model, ids):
    """The MTP layer's logits in torch, row p for the pair (h[p-1], ids[p]) (h: the trunk's hidden state after the
    output norm; zeros before the first token, as llama.cpp's own driver pairs it): what it drafts after ids[p]."""
    import copy

    import torch
    import transformers

    from chatglm.devtools.glm4 import nextn_layer

    cfg, n = copy.deepcopy(model.config), model.config.num_hidden_layers
    cfg.num_hidden_layers, cfg.first_k_dense_replace = 1, 0  # the NextN block alone, an expert layer
    pre = f"model.layers.{n}."
    w = {k[len(pre):]: v for k, v in nextn_layer(model, 1).items()}  # what build_checkpoint saved (seed + 1)
    n_exp = cfg.n_routed_experts
    experts = {"mlp.experts.gate_up_proj": torch.stack([torch.cat([w.pop(f"mlp.experts.{x}.gate_proj.weight"),
                                                                   w.pop(f"mlp.experts.{x}.up_proj.weight")])
                                                        for x in range(n_exp)]),
               "mlp.experts.down_proj": torch.stack([w.pop(f"mlp.experts.{x}.down_proj.weight")
                                                     for x in range(n_exp)])}
    head_parts = {k: w.pop(k) for k in [k for k in w if k.startswith(("eh_proj", "enorm", "hnorm", "shared_head",
                                                                     "embed_tokens"))]}
    block = transformers.Glm4MoeModel(cfg).eval()
    state = {f"layers.0.{k}": v for k, v in {**w, **experts}.items()}
    state["norm.weight"] = head_parts["shared_head.norm.weight"]
    missing, unexpected = block.load_state_dict(state, strict=False)
    assert missing == ["embed_tokens.weight"] and not unexpected
    eps = cfg.rms_norm_eps

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, H), after the output norm
        h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])  # (T, H): h[p-1], zeros at p = 0
        e = head_parts["embed_tokens.weight"][torch.tensor(ids)]  # (T, H)
        x = torch.cat([rms(e, head_parts["enorm.weight"]), rms(h_prev, head_parts["hnorm.weight"])], -1) \
            @ head_parts["eh_proj.weight"].T  # (T, H)
        out = block(inputs_embeds=x[None], position_ids=torch.arange(len(ids))[None]).last_hidden_state[0]
        return (out @ head_parts["shared_head.head.weight"].T).numpy()  # (T, V)


def mtp_drafts(glm45, every: int, n_gen: int) -> list[tuple[int, list[int], int]]:
    """Generate greedily with MTP asked for a draft only every ``every`` steps; check each draft against the layer
    computed in torch (argmax within 1e-4); return (position, draft, MTP cache fill before it) per draft."""
    model, path = glm45
    drafts = []
    with load(path, mtp=True, adaptive=False, **SETTINGS) as m:
        ids = repetitive_prompt(m)[:60]
        drafter, inner = m.drafter, m.drafter.draft

        def asked(history, n):
            if len(history) % every:
                return []
            fed = drafter.fed
            guess = inner(history, n)
            drafts.append((len(history) - 1, guess, fed))
            return guess

        drafter.draft = asked
        tokens, _ = generate(m, ids, SamplingParams(temperature=0.0, max_tokens=n_gen))
    ref = mtp_reference(model, ids + tokens)
    for pos, guess, _ in drafts:
        row = ref[pos]
        assert guess and row[guess[0]] >= row.max() - 1e-4 * np.abs(row).max(), (pos, guess, int(row.argmax()))
    return drafts


def test_mtp_drafts_what_the_layer_predicts(glm45):
    """Each draft is the argmax of the MTP layer for the pending token and the hidden state before it, as computed
    in torch from the checkpoint: the pairs llama.cpp's MTP context sees are the right ones."""
    assert len(mtp_drafts(glm45, every=1, n_gen=16)) >= 10


def test_mtp_drafts_right_after_steps_without_drafting(glm45):
    """While no draft is asked for (the adaptive controller resting) the MTP layer is not run: the pairs wait and
    go into its cache in one batch at the next draft, which is still the layer's argmax computed in torch."""
    drafts = mtp_drafts(glm45, every=5, n_gen=24)
    assert len(drafts) >= 3 and all(pos - fed >= 4 for pos, _, fed in drafts[1:])  # pairs were caught up


def test_mtp_greedy_identical(glm45_gguf):
    """The MTP layer drafts one token per step (through the public C API: the target's output embeddings are its
    hidden state, the pairs go into an MTP context with llama_batch_ext); the output is plain decoding's."""
    want, got, stats = same_output(glm45_gguf, SpeculativeConfig(mtp=True, adaptive=False))
    assert got == want
    for s in stats:  # one draft per verification, each a vocabulary id
        assert s.verifications == s.drafted_tokens > 20


def test_mtp_with_lookup(glm45_gguf):
    want, got, _ = same_output(glm45_gguf, SpeculativeConfig(mtp=True, lookup=4, adaptive=False))
    assert got == want


def test_mtp_refused_without_a_usable_layer(glm45_gguf, glm4_ggufs, tmp_path):
    from fixtures_glm5_next import rewrite_gguf

    with pytest.raises(UnsupportedModelError, match="MTP drafting runs on glm4moe models, not 'glm4'"):
        load(glm4_ggufs["glm4-0414"], mtp=True, **SETTINGS)
    broken = rewrite_gguf(glm45_gguf, tmp_path / "no-eh.gguf", {}, drop=("blk.3.nextn.eh_proj.weight",))
    with pytest.raises(InputError, match=r"NextN layer lacks blk\.3\.nextn\.eh_proj\.weight"):
        load(broken, mtp=True, **SETTINGS)


def test_glm1_engine_refused(glm1_gguf):
    """ChatGLM-6B runs on our own graph, which evaluates one token at a time: speculation is refused in one line."""
    with pytest.raises(UnsupportedModelError, match="speculative decoding needs the llama.cpp engine; chatglm1"):
        load(glm1_gguf, n_ctx=128, n_threads=1, lookup=4)


def test_info_says_mtp_drafts(glm45_gguf):
    r = cli(["info", str(glm45_gguf)])
    assert r.code == 0 and "chatglm run --mtp drafts with them" in r.out


def test_draft_that_is_not_a_gguf_refused(glm4_ggufs, tmp_path):
    junk = tmp_path / "draft.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InputError) as err:
        load(glm4_ggufs["glm4"], draft=junk, **SETTINGS)
    assert "draft.gguf" in str(err.value) and "\n" not in str(err.value)
