"""The benchmark harness (scripts/bench.py) works end to end on a tiny model: every workload runs, the peers hold
gpt2fn's weights, and the JSON carries the fields the README table is built from. No timing is asserted."""

import json
import sys

import pytest
import torch

import gpt2fn

pytest.importorskip("transformers", reason="transformers is the benchmark's peer (a dev extra); install gpt2fn[dev]")

import bench  # noqa: E402  -- the project's own script (tests/conftest.py puts scripts/ on the path)
import bench_peers as peers  # noqa: E402


def _check_result(r: "bench.Result") -> None:
    assert r.samples and all(s > 0 for s in r.samples), r
    assert min(r.samples) <= r.median <= max(r.samples)


def test_peers_compute_the_same_function_as_gpt2fn_on_the_same_weights(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=4)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    diffs = peers.same_weights_check(params, ids)
    assert set(diffs) == {"seed", "transformers"}
    assert max(diffs.values()) < 1e-4, diffs
    untied = gpt2fn.init_params(tiny_config.replace(qkv_bias=False, tie_head=False), seed=4)
    assert peers.same_weights_check(untied, ids)["seed"] < 1e-4
    nano = peers.nano_from_params(params)
    targets = ids.roll(-1, dims=1)
    torch.testing.assert_close(nano(ids, targets), gpt2fn.loss(params, ids, targets), atol=1e-5, rtol=1e-5)


def test_decode_contenders_agree_on_greedy_ids_and_report_throughput_and_ttft(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=1)
    results = bench.bench_decode(params, batch=2, prompt_len=5, new_tokens=4, repeats=1, ttft_repeats=1,
                                 with_seed=True)
    by = {(r.workload, r.contender): r for r in results}
    assert {w for w, _ in by} == {"decode", "ttft"}
    assert {c for _, c in by} == {bench.GPT2FN, bench.HF, bench.SEED}
    for r in results:
        _check_result(r)
    for c in (bench.GPT2FN, bench.HF, bench.SEED):
        assert by[("decode", c)].extra["ids_agree_with_gpt2fn"] == 1.0
        assert by[("decode", c)].metric == "tok/s" and by[("ttft", c)].metric == "ms"


def test_speculative_workload_reports_acceptance_beside_transformers_assisted_generation(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=5)
    results = bench.bench_speculative(params, prompt_len=8, new_tokens=6, repeats=1)
    for r in results:
        _check_result(r)
    assert {r.workload for r in results} == {"speculative"}
    by_case: dict[str, set[str]] = {}
    for r in results:
        by_case.setdefault(r.case, set()).add(r.contender)
        assert 0.0 <= r.extra["acceptance_rate"] <= 1.0
        if r.contender.startswith(bench.GPT2FN):  # speculative greedy is the target's own greedy
            assert r.extra["ids_agree_with_gpt2fn"] == 1.0, r
    assert sorted(by_case) == ["fp32 b1 draft 1/2 layers k4", "fp32 b1 prompt lookup k4"]
    assert by_case["fp32 b1 draft 1/2 layers k4"] == {"gpt2fn draft=model", "gpt2fn alone",
                                                      "transformers assistant_model=", "transformers alone"}
    assert by_case["fp32 b1 prompt lookup k4"] == {"gpt2fn draft=prompt_lookup", "gpt2fn alone",
                                                   "transformers prompt_lookup_num_tokens=", "transformers alone"}
    assert bench.plan_from(bench.parse_args(["--only", "speculative"])).only == ("speculative",)


def _tiny_pair(seconds: float = 2.0) -> dict[str, "bench.Recipe"]:
    small = dict(vocab_size=50257, context_length=32, n_heads=2)  # GPT-2's ids: the corpus is GPT-2 tokens
    return {"target": bench.Recipe(gpt2fn.preset("mini", n_layers=2, emb_dim=32, **small), seconds, 15, 4e-3),
            "draft": bench.Recipe(gpt2fn.preset("mini", n_layers=1, emb_dim=16, **small), seconds, 15, 4e-3)}


def test_speculative_bench_trains_a_pair_on_the_demo_text_then_reuses_it(tmp_path, monkeypatch):
    recipes = _tiny_pair()
    monkeypatch.setattr(bench, "SPEC_PAIR", recipes)  # the command's pair, small: seconds from the command line
    pair_dir, out = tmp_path / "pair", tmp_path / "bench.json"
    assert bench.main(["--only", "speculative", "--preset", "tiny", "--spec-trained", str(pair_dir),
                       "--spec-train-seconds", "3,2", "--new-tokens", "6", "--repeats", "1",
                       "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    assert (pair_dir / "corpus" / "pydoc_topics.txt").read_text() == gpt2fn.train.pydoc_prose()
    results = [r for r in json.loads(out.read_text())["results"] if "trained" in r["case"]]
    by_case: dict[str, set[str]] = {}
    for r in results:
        assert r["samples"] and all(x > 0 for x in r["samples"]), r
        by_case.setdefault(r["case"], set()).add(r["contender"])
        assert 0.0 <= r["extra"]["acceptance_rate"] <= 1.0 and r["extra"]["prompt_len"] == 16
        if r["contender"].startswith(bench.GPT2FN):  # speculative greedy is the target's own greedy
            assert r["extra"]["ids_agree_with_gpt2fn"] == 1.0, r
        for name, budget in (("target", 3.0), ("draft", 2.0)):  # each model's config and training, in every row
            info, recipe = r["extra"]["pair"][name], recipes[name]
            assert gpt2fn.GPTConfig.from_dict(info["config"]) == recipe.config
            assert info["trained_ids"] > 100 and 0 < info["train_seconds"] and 0 < info["steps"] <= recipe.steps
            assert info["train_loss"] > 0 and info["val_loss"] > 0 and info["budget_seconds"] == budget
    assert by_case == {"fp32 b1 trained draft 1/2 layers k4": {"gpt2fn draft=model", "gpt2fn alone",
                                                              "transformers assistant_model=", "transformers alone"},
                       "fp32 b1 trained prompt lookup k4": {"gpt2fn draft=prompt_lookup", "gpt2fn alone",
                                                            "transformers prompt_lookup_num_tokens=",
                                                            "transformers alone"}}
    assert not (pair_dir / "target" / "state.safetensors").exists()  # only the weights are kept
    # the prompt is held-out corpus text
    prompt = bench.corpus_prompt(pair_dir, prompt_len=16, context=32)[0]
    assert gpt2fn.tokenizer.decode(prompt.tolist()) in gpt2fn.train.pydoc_prose()
    # a second run reuses the saved pair; a folder holding another config is refused with the fix
    monkeypatch.setattr(gpt2fn.train, "train", lambda *a, **kw: pytest.fail("the saved pair was trained again"))
    pair = bench.trained_pair(pair_dir, device=torch.device("cpu"), recipes=recipes)
    assert pair["draft"][0].config.trained_vocab == pair["target"][0].config.trained_vocab is not None
    wider = dict(recipes, draft=bench.Recipe(recipes["draft"].config.replace(emb_dim=32), 2.0, 15, 4e-3))
    with pytest.raises(SystemExit, match="remove .*draft to train it again"):
        bench.trained_pair(pair_dir, device=torch.device("cpu"), recipes=wider)


def test_spec_trained_options_reach_the_plan_and_are_checked():
    plan = bench.plan_from(bench.parse_args(["--only", "speculative", "--spec-trained", "runs/p",
                                             "--spec-train-seconds", "30,10"]))
    assert plan.spec_trained == "runs/p" and plan.spec_seconds == (30.0, 10.0)
    assert bench.plan_from(bench.parse_args(["--only", "speculative"])).spec_trained is None
    for argv, message in ((["--only", "decode", "--spec-trained", "p"], "add speculative to --only"),
                          (["--only", "speculative", "--spec-train-seconds", "5,5"], "add --spec-trained"),
                          (["--only", "speculative", "--spec-trained", "p", "--spec-train-seconds", "5"],
                           "two numbers")):
        with pytest.raises(SystemExit, match=message):
            bench.plan_from(bench.parse_args(argv))


def test_prefill_checks_train_and_limits_each_produce_interleaved_results(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=2)
    results = (bench.bench_limits(torch.device("cpu"), mbytes=4, gemm_n=32, repeats=1)
               + bench.bench_prefill(params, seq=20, repeats=1)
               + bench.bench_checks(params, prompt_len=4, new_tokens=3, prefill_seq=20, repeats=1)
               + bench.bench_train(tiny_config, batch=2, device=torch.device("cpu"), repeats=1))
    for r in results:
        _check_result(r)
    cases = {(r.workload, r.case, r.contender) for r in results}
    assert ("prefill", "20 tok last logits", bench.GPT2FN) in cases
    assert ("prefill", "20 tok all logits", bench.HF) in cases
    assert {c for w, _, c in cases if w == "checks"} == {"checks on", "checks off"}
    train = [r.contender for r in results if r.workload == "train"]
    assert train[0].startswith(bench.GPT2FN) and any(c.startswith("nn.Module") for c in train)
    assert {c for w, cs, c in cases if w == "limits"} >= {"read (sum)", "copy (read+write)"}


def test_timed_train_step_really_updates_the_weights_it_keeps(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=3)
    label, step = bench.gpt2fn_train_step(params, lr=1e-2)
    assert label.startswith(bench.GPT2FN)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = [float(step(ids, ids)) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1, losses  # one batch, over and over: the loss must fall


def test_child_load_reports_seconds_peak_memory_and_weight_bytes(tiny_config, tmp_path):
    files = bench.write_checkpoints(tmp_path, config=tiny_config,
                                    seed_config=tiny_config.replace(qkv_bias=False, tie_head=False))
    got = bench.child_load("gpt2fn.load", str(files["safetensors"]))
    expected_bytes = sum(t.nbytes for t in gpt2fn.params_to_dict(gpt2fn.load(files["safetensors"])).values())
    assert got["weight_bytes"] == expected_bytes
    assert got["peak_rss"] >= got["rss_before"] > 0 and got["ready_s"] >= got["load_s"] > 0
    pth = bench.child_load("gpt2fn.load", str(files["pth"]), str(tiny_config.n_heads))
    seed_params = gpt2fn.init_params(tiny_config.replace(qkv_bias=False, tie_head=False), seed=0)
    assert pth["weight_bytes"] == sum(t.nbytes for t in gpt2fn.params_to_dict(seed_params).values())


def test_roofline_counts_every_weight_once_per_step():
    cfg = gpt2fn.preset("gpt2")
    nbytes, flops = bench.decode_bytes_per_step(cfg, dtype=torch.float32, batch=1, prompt_len=16, new_tokens=0)
    params = gpt2fn.init_params(cfg.replace(n_layers=1), seed=0)  # count per-layer bytes on a one-layer copy
    one_layer = sum(t.nbytes for n, t in gpt2fn.named_leaves(params) if n.startswith("blocks."))
    head = cfg.vocab_size * cfg.emb_dim * 4
    kv = 2 * cfg.n_layers * cfg.emb_dim * 16 * 4
    assert nbytes == pytest.approx(cfg.n_layers * one_layer + head + 2 * cfg.emb_dim * 4 + kv)
    half, _ = bench.decode_bytes_per_step(cfg, dtype=torch.bfloat16, batch=1, prompt_len=16, new_tokens=0)
    assert half == pytest.approx(nbytes / 2)


def test_main_writes_json_with_the_table_targets_and_machine(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--preset", "tiny", "--only", "decode,prefill", "--repeats", "1",
                       "--new-tokens", "3", "--batches", "1", "--dtypes", "fp32",
                       "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"command", "machine", "plan", "results", "ratios", "targets", "roofline", "table", "notes"}
    assert set(data["machine"]) >= {"cpu", "cores", "threads", "torch", "device"}
    r = data["results"][0]
    assert set(r) >= {"workload", "case", "contender", "metric", "samples", "median", "min", "max"}
    assert {t["workload"] for t in data["targets"]} == {"decode"}  # prefill's target names the 1024-token case
    assert all(set(t) >= {"value", "goal", "met"} for t in data["targets"])
    assert "| decode | fp32 b1 | gpt2fn |" in data["table"]
    assert any(x["peer"] == bench.HF and x["speedup"] > 0 for x in data["ratios"])


def test_unknown_workload_is_refused():
    with pytest.raises(SystemExit, match="unknown workloads"):
        bench.plan_from(bench.parse_args(["--only", "decode,bogus"]))


def test_attribution_and_sae_workloads_time_every_contender(tiny_config):
    params = gpt2fn.init_params(tiny_config, seed=2)
    found, notes = bench.bench_attribution(params, seq=6, repeats=1)
    sae = bench.bench_sae(params, seq=8, expansion=2, repeats=1)
    for r in found + sae:
        _check_result(r)
    assert {r.contender for r in found} == {"gpt2fn AtP", "gpt2fn EAP (all edges)", "gpt2fn head_patching_sweep"}
    assert [r.contender for r in sae][0] == bench.GPT2FN and len(sae) == 3
    assert notes and "attribution" in notes[0]
    assert {"attribution", "sae"} <= set(bench.WORKLOADS)


# ---------------------------------------------------------------------------------------------------------------
# CTranslate2 and llama.cpp (optional: environments of their own, made by scripts/setup_peers.sh)


def test_first_mismatch_names_the_earliest_step_then_row():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert bench.first_mismatch(ref.clone(), ref) is None
    got = ref.clone()
    got[0, 3], got[1, 1] = 0, 9
    assert bench.first_mismatch(got, ref) == {"row": 1, "step": 1, "gpt2fn": 6, "peer": 9}


def test_engines_are_skipped_with_a_note_naming_the_fix_when_absent(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2FN_PEERS_DIR", str(tmp_path / "no-peers"))
    monkeypatch.setenv("GPT2FN_CT2_PYTHON", str(tmp_path / "missing-python"))
    monkeypatch.delenv("GPT2FN_LLAMACPP_PYTHON", raising=False)
    params = gpt2fn.init_params(tiny_config, seed=0)
    workers, notes = peers.start_engines(params, tmp_path, threads=1)
    assert workers == {} and len(notes) == 2
    assert "ctranslate2 fp32, ctranslate2 int8 skipped" in notes[0] and "missing-python is not a file" in notes[0]
    assert "llama.cpp F32, llama.cpp F16 skipped" in notes[1] and "setup_peers.sh llamacpp" in notes[1]
    # an environment that is there, but a vocabulary the converters cannot take: refused before any work
    monkeypatch.setenv("GPT2FN_CT2_PYTHON", sys.executable)
    workers, notes = peers.start_engines(params, tmp_path, threads=1)
    assert workers == {} and "vocab_size 97" in notes[-1] and "--vocab-size 50257" in notes[-1]
    assert not (tmp_path / "hf").exists()
    results = bench.bench_decode(params, batch=1, prompt_len=3, new_tokens=2, repeats=1, ttft_repeats=1,
                                 with_hf=False, engines=workers)
    assert {r.contender for r in results} == {bench.GPT2FN}


def test_gpt2_tokenizer_files_tokenize_as_gpt2fn_does(tmp_path):
    from gpt2fn.tokenizer import bpe_path, encode

    if not bpe_path().is_file():
        pytest.skip(f"the GPT-2 BPE table is not at {bpe_path()} (python -m gpt2fn.tokenizer fetch)")
    from transformers import AutoTokenizer

    peers.gpt2_tokenizer_files(tmp_path)
    assert len((tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 50000
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello, it is time.\n\n  Ünïcode 日本語, numbers 12345 and\ttabs <|endoftext|> done"
    assert tok.encode(text) == encode(text, allow_special=True)


@pytest.mark.slow
def test_engines_decode_gpt2fns_ids_and_its_logits_on_a_tiny_model(tiny_config, tmp_path):
    chosen = tuple(p for p in peers.ENGINE_PEERS if "fp32" in p.cases and peers.engine_python(p.engine)[0])
    if not chosen:
        pytest.skip("no CTranslate2 / llama.cpp environment (scripts/setup_peers.sh; GPT2FN_PEERS_DIR)")
    params = gpt2fn.init_params(tiny_config.replace(vocab_size=50257), seed=1)
    workers, notes = peers.start_engines(params, tmp_path, threads=1, peers=chosen)
    try:
        assert set(workers) == {p.label for p in chosen}, notes
        errors = {r.contender: r for r in bench.bench_formats(params, batch=2, seq=5, engines=workers)
                  if r.case == "fp32"}
        for label in (*workers, bench.HF):
            assert errors[label].median < 1e-3, errors[label]
        results = bench.bench_decode(params, batch=2, prompt_len=5, new_tokens=4, repeats=1, ttft_repeats=1,
                                     with_hf=False, engines=workers)
    finally:
        for w in workers.values():
            w.close()
    by = {(r.workload, r.contender): r for r in results}
    for label in workers:
        _check_result(by[("decode", label)])
        assert by[("decode", label)].extra["ids_agree_with_gpt2fn"] == 1.0, by[("decode", label)].extra
        assert by[("ttft", label)].metric == "ms"
