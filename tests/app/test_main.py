"""The medusa-jax command: help, info, generate/chat/bench on a tiny model, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from medusa_jax.adapters.convert import Target
from medusa_jax.app import bench, chat
from medusa_jax.app import convert as convert_cmd
from medusa_jax.app import generate as gen
from medusa_jax.app import main as cli
from medusa_jax.decoding.engine import Engine
from medusa_jax.decoding import text
from medusa_jax.decoding.requests import SamplingParams
from medusa_files import head_tensors
from tiny_model import make_tiny_adapter_dir, make_tiny_llama_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, stdin: str | None = None, env: dict | None = None, timeout: int = 240):
  """Runs ``python -m medusa_jax ARGS`` (the console script's code) in a subprocess."""
  full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
  return subprocess.run([sys.executable, "-m", "medusa_jax", *args], input=stdin,
                        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def _assert_one_line_error(stderr: str, *needles: str):
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, stderr
  assert "Traceback" not in stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny")
  cfg = make_tiny_llama_dir(root / "model", seed=3)
  make_tiny_adapter_dir(root / "adapter", hidden=cfg["hidden_size"], num_heads=3, seed=4)
  return str(root / "model"), str(root / "adapter")


@pytest.fixture(scope="module")
def engine(tiny_dirs):
  return Engine.load(*tiny_dirs, max_cache_len=256, max_tree_rows=16)


def _use(monkeypatch, engine):
  """The engine-loading commands get ``engine`` instead of loading one."""
  for module in (gen, chat, bench):
    monkeypatch.setattr(module, "load_engine", lambda *a, **k: engine)


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help_with_examples(command, capsys):
  if command == "demo":
    pytest.importorskip("medusa_jax.app.demo")
  assert cli.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert f"medusa-jax {command}" in out
  assert "examples:" in out  # every command shows how it is used


def test_console_help_in_a_subprocess():
  res = _run("--help")
  assert res.returncode == 0, res.stderr
  for command in cli.COMMANDS:
    assert f"  {command} " in res.stdout
  assert "examples:" in res.stdout


# ----------------------------------------------------------------------------- info


def test_info_json_reports_cache_devices_versions(tmp_path):
  res = _run("info", "--json", env={"MEDUSA_JAX_HOME": str(tmp_path)})
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout)
  assert report["cache"]["home"] == str(tmp_path)
  assert all(not a["present"] for a in report["cache"]["assets"].values())
  assert report["cache"]["training_runs"] == []
  assert report["devices"]["backend"] == "cpu" and report["devices"]["count"] >= 1
  for name in ("jax", "flax", "optax", "orbax-checkpoint"):
    assert report["versions"][name]
  from medusa_jax.bundled import SMOLLM2_HEADS as BUNDLED_HEADS
  assert report["bundled_heads"]["path"] == BUNDLED_HEADS


def test_info_text_lists_present_assets(tmp_path, capsys):
  (tmp_path / "mtbench").mkdir()
  (tmp_path / "mtbench" / "question.jsonl").write_text("{}\n")
  (tmp_path / "training" / "smollm2_v2").mkdir(parents=True)
  assert cli.main(["info", "--home", str(tmp_path), "--no-devices"]) == 0
  out = capsys.readouterr().out
  line = next(ln for ln in out.splitlines() if "mtbench_jsonl" in ln)
  assert "3 B" in line and "missing" not in line
  assert "missing (run `medusa-jax fetch`)" in out and "devices:" not in out
  assert "training runs: smollm2_v2" in out


# ----------------------------------------------------------------------------- generate / chat


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_stream_is_lossless_and_matches_engine(engine, mode):
  params = SamplingParams(speculate=mode, max_new_tokens=10)
  ids = text.chat_ids(engine, "Hello, tiny model!")
  chunks = list(text.stream_tokens(engine, ids, params))
  tokens = [t for c in chunks for t in c.tokens]
  plain = engine.generate([ids], 10, speculate="none")
  assert tokens == plain.tokens[0]
  stats = chunks[-1].stats
  assert stats.speculate == mode and stats.new_tokens == len(tokens)
  assert stats.steps == len(chunks) - 1 == sum(stats.accept_hist)
  assert stats.tokens_per_step == pytest.approx((len(tokens) - 1) / stats.steps)
  assert all(c.stats is None for c in chunks[:-1])


def test_stream_text_never_splits_a_character(engine, monkeypatch):
  # Force the tokens of a two-byte character to arrive in separate steps.
  euro = engine.tokenizer.encode("é")
  assert len(euro) == 2
  fake = [text.StreamChunk(tokens=(euro[0],)), text.StreamChunk(tokens=(euro[1],)),
          text.StreamChunk(tokens=tuple(engine.tokenizer.encode("x")), stats="S")]
  monkeypatch.setattr(text, "stream_tokens", lambda *a: iter(fake))
  pieces = [c.text for c in text.stream_text(engine, [5], SamplingParams())]
  assert pieces == ["", "é", "x"]


def test_generate_main_streams_and_json(engine, tiny_dirs, monkeypatch, capsys):
  _use(monkeypatch, engine)
  assert cli.main(["generate", "Hi", "--speculate", "tree", "--max-new-tokens", "6",
                   "--model-dir", tiny_dirs[0]]) == 0
  streamed = capsys.readouterr()
  assert "tokens/step" in streamed.err and "speculate=tree" in streamed.err
  assert cli.main(["generate", "Hi", "--speculate", "none", "--max-new-tokens", "6",
                   "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["text"] == engine.tokenizer.decode(row["tokens"], skip_special_tokens=True)
  assert streamed.out == row["text"] + "\n"  # streamed tree text == plain greedy text
  assert row["stats"]["speculate"] == "none" and row["stats"]["tokens_per_step"] == 1.0


def test_generate_in_a_subprocess_on_a_tiny_model(tiny_dirs):
  model, adapter = tiny_dirs
  res = _run("generate", "Hello", "-", "--model-dir", model, "--adapter", adapter,
             "--max-new-tokens", "5", "--speculate", "chain", "--max-cache-len", "128", "--json",
             stdin="from stdin")
  assert res.returncode == 0, res.stderr
  rows = [json.loads(line) for line in res.stdout.splitlines()]
  assert [r["prompt"] for r in rows] == ["Hello", "from stdin"]
  assert all(len(r["tokens"]) == 5 and r["stats"]["speculate"] == "chain" for r in rows)


def test_chat_piped_stdin_ends_on_eof(tiny_dirs):
  model, adapter = tiny_dirs
  res = _run("chat", "--model-dir", model, "--adapter", adapter, "--max-new-tokens", "4",
             "--max-cache-len", "256", "--stats", stdin="Hi there\n\n/reset\nAgain\n")
  assert res.returncode == 0, res.stderr
  # Two answers: the blank line and /reset are no turns.
  assert res.stderr.count("tokens/step") == 2 and res.stdout.endswith("\n")


def test_chat_session_keeps_history_and_drops_old_turns(engine, monkeypatch, capsys):
  params = SamplingParams(speculate="none", max_new_tokens=4)
  session = text.ChatSession(engine, params, system="Be brief.")
  first, _ = session.reply("one")
  assert session.turns == [{"role": "user", "content": "one"},
                           {"role": "assistant", "content": first}]
  session.reply("two " * 15)
  assert len(session.turns) == 4
  # A turn that does not fit next to the history pushes the oldest pair out.
  budget = engine.max_cache_len - params.max_new_tokens - 64
  third = "three " * 10
  assert len(text.chat_ids(engine, session.messages(third))) > budget
  session.reply(third)
  users = [t["content"] for t in session.turns[::2]]
  assert users[-1] == third and "one" not in users
  # A turn too long on its own fails alone; the chat goes on (chat_main prints one line).
  _use(monkeypatch, engine)
  ns = cli.build_parser().parse_args(["chat", "--max-new-tokens", "4", "--speculate", "none",
                                      "--stats"])
  rc = chat.run(ns, stdin=io.StringIO("x" * 400 + "\nok\n"))
  captured = capsys.readouterr()
  assert rc == 0 and "exceeds max_cache_len" in captured.err
  assert captured.err.count("tokens/step") == 1


def test_bench_reports_every_mode(engine, monkeypatch, capsys):
  _use(monkeypatch, engine)
  assert cli.main(["bench", "--modes", "tree", "none", "--batch-sizes", "1", "2",
                   "--max-new-tokens", "12", "--prompts", "a b", "c", "--json",
                   "--no-progress"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = report["rows"]
  assert [(r["batch"], r["mode"]) for r in rows] == [(1, "none"), (1, "tree"), (2, "none"),
                                                     (2, "tree")]
  assert all(r["same_as_plain"] is not False for r in rows)  # greedy speculation is lossless
  assert rows[1]["same_as_plain"] is True and rows[1]["speedup"] > 0
  table = bench.format_bench(report)
  assert len(table.splitlines()) == 2 + len(rows) and "tree" in table


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv,needles", [
    (["generate"], ["medusa-jax generate: error:", "PROMPT"]),
    (["generate", "hi", "--speculate", "fast"], ["invalid choice: 'fast'"]),
    (["generate", "hi", "--max-new-tokens", "zero"], ["invalid int value"]),
    (["generate", "hi", "--max-new-tokens", "0"], ["max_new_tokens=0"]),
    (["generate", "hi", "--temperature", "-1"], ["temperature"]),
    (["generate", "hi", "--top-p", "1.5"], ["top_p"]),
    (["chat", "--unknown"], ["unrecognized arguments: --unknown"]),
    (["bench", "--batch-sizes", "0", "--max-new-tokens", "1"], ["batch size 0"]),
    (["bench", "--max-new-tokens", "0"], ["--max-new-tokens=0"]),
    (["convert", "only-src"], ["required: dst"]),
    (["convert", "/no/such/dir", "out"], ["/no/such/dir: no such file"]),
    (["convert", "a", "b", "--to", "gguf"], ["invalid choice: 'gguf'"]),
    (["info", "--bogus"], ["unrecognized arguments"]),
    (["nope"], ["invalid choice: 'nope'"]),
    ([], ["missing COMMAND"]),
])
def test_user_errors_are_one_line_exit_2(argv, needles, engine, monkeypatch, capsys):
  _use(monkeypatch, engine)
  assert cli.main(argv) == 2
  _assert_one_line_error(capsys.readouterr().err, *needles)


def test_bad_arguments_in_a_subprocess_and_debug_traceback():
  res = _run("generate", "hi", "--speculate", "fast")
  assert res.returncode == 2 and res.stdout == ""
  _assert_one_line_error(res.stderr, "medusa-jax generate: error:", "invalid choice")
  res = _run("convert", "/no/such/dir", "out", "--debug")
  assert res.returncode != 0 and "Traceback" in res.stderr
  assert "WeightsNotFoundError" in res.stderr


def test_request_error_from_the_engine_is_one_line(engine, monkeypatch, capsys):
  _use(monkeypatch, engine)
  assert cli.main(["generate", "x" * 300, "--max-new-tokens", "4"]) == 2
  _assert_one_line_error(capsys.readouterr().err, "exceeds max_cache_len (256)")
  with pytest.raises(Exception, match="exceeds max_cache_len"):
    cli.main(["--debug", "generate", "x" * 300, "--max-new-tokens", "4"])


def test_internal_error_exit_1_with_hint_and_missing_module(monkeypatch, capsys):
  def boom(ns):
    raise RuntimeError("kaput\nsecond line")
  from medusa_jax.app import info
  monkeypatch.setattr(info, "run", boom)
  assert cli.main(["info"]) == 1
  _assert_one_line_error(capsys.readouterr().err, "RuntimeError: kaput second line", "--debug")
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(RuntimeError, match="kaput"):
    cli.main(["info"])
  monkeypatch.undo()
  monkeypatch.setitem(cli.COMMANDS, "info", "not_a_module")
  assert cli.main(["info"]) == 2
  _assert_one_line_error(capsys.readouterr().err, "not available in this build")


def test_debug_flag_is_taken_anywhere_before_double_dash():
  assert cli._split_debug(["generate", "--debug", "hi"]) == (["generate", "hi"], True)
  assert cli._split_debug(["generate", "--", "--debug"]) == (["generate", "--", "--debug"],
                                                             False)


def test_sampling_params_validate(engine):
  with pytest.raises(ValueError, match="speculate='fast'"):
    SamplingParams(speculate="fast")
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingParams(max_new_tokens=True)
  with pytest.raises(ValueError, match="empty prompt"):
    list(text.stream_tokens(engine, [], SamplingParams()))
  vocab = engine.cfg.vocab_size
  with pytest.raises(ValueError, match=rf"token 1 = {vocab}; expected an integer id"):
    list(text.stream_tokens(engine, [1, vocab], SamplingParams()))
  with pytest.raises(ValueError, match="dtype='float64'"):
    Engine.load(dtype="float64")
  np.testing.assert_array_equal(text.chat_ids(engine, "hi"),
                                text.chat_ids(engine, [{"role": "user", "content": "hi"}]))


def test_convert_choices_are_the_target_formats():
  assert convert_cmd.TARGETS == tuple(t.value for t in Target)


def test_main_prints_result_and_json(tmp_path, capsys):
  rng = np.random.default_rng(6)
  save_file(head_tensors(rng, n=3, hidden=16), str(tmp_path / "h.safetensors"))
  assert cli.main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "o"), "--base-model", "b",
               "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["to"] == "lorax" and out["config"]["medusa_num_heads"] == 3
  assert cli.main(["convert", str(tmp_path / "o"), str(tmp_path / "ob"), "--to", "orbax"]) == 0
  assert "wrote orbax" in capsys.readouterr().out


# ----------------------------------------------------------- issue 14: every request fails alone


def test_generate_fails_a_bad_prompt_alone_then_exits_2(engine, monkeypatch, capsys):
  """A lone surrogate (invalid UTF-8 in argv) makes the tokenizer raise a bare TypeError."""
  _use(monkeypatch, engine)
  rc = cli.main(["generate", "Hi", "bad \ud800", "Bye", "--speculate", "none",
                 "--max-new-tokens", "4", "--json"])
  out = capsys.readouterr()
  assert rc == 2
  rows = [json.loads(line) for line in out.out.splitlines()]
  assert [r["prompt"] for r in rows] == ["Hi", "Bye"]
  assert all(len(r["tokens"]) == 4 for r in rows)
  _assert_one_line_error(out.err, "medusa-jax generate: error: prompt 1: cannot prepare the"
                         " prompt (TypeError")


def test_chat_fails_a_bad_turn_alone_and_exits_0(engine, monkeypatch, capsys):
  _use(monkeypatch, engine)
  ns = cli.build_parser().parse_args(["chat", "--max-new-tokens", "3", "--speculate", "none",
                                      "--stats"])
  rc = chat.run(ns, stdin=io.StringIO("Hi\nbad \ud800 turn\nAgain\n"))
  captured = capsys.readouterr()
  assert rc == 0
  assert captured.err.count("tokens/step") == 2
  assert "medusa-jax chat: error: cannot prepare the prompt (TypeError" in captured.err


def test_chat_reads_invalid_utf8_from_a_pipe_as_a_failed_turn(engine, monkeypatch, capsys):
  """Bytes that are not UTF-8 on stdin fail their turn, typed; they do not end the chat."""
  _use(monkeypatch, engine)
  ns = cli.build_parser().parse_args(["chat", "--max-new-tokens", "3", "--speculate", "none",
                                      "--stats"])
  pipe = io.TextIOWrapper(io.BytesIO(b"Hi\n\xff\xfe broken\nAgain\n"), encoding="utf-8")
  assert chat.run(ns, stdin=pipe) == 0
  err = capsys.readouterr().err
  assert err.count("tokens/step") == 2 and "cannot prepare the prompt" in err


@pytest.mark.parametrize("argv,needles", [
    (["demo", "--prompts", "0"], ["argument --prompts: '0': expected an integer >= 1"]),
    (["demo", "--max-new-tokens", "-3"], ["expected an integer >= 1"]),
    (["eval", "--num-questions", "-1"], ["expected an integer >= 0"]),
])
def test_bad_counts_are_usage_errors(argv, needles, capsys):
  assert cli.main(argv) == 2
  _assert_one_line_error(capsys.readouterr().err, *needles)


def test_fetch_into_a_file_and_a_full_disk_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
  (tmp_path / "f").write_text("x")
  assert cli.main(["fetch", "--home", str(tmp_path / "f"), "--quiet"]) == 2
  _assert_one_line_error(capsys.readouterr().err, f"{tmp_path / 'f'}: the cache home is not a"
                         " directory")
  import errno
  from medusa_jax import _atomic
  from medusa_jax.adapters.weights import MedusaWeights
  from medusa_jax.config import MedusaConfig

  def full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  w = MedusaWeights.init(MedusaConfig(base_model_name_or_path="b", medusa_num_heads=2,
                                      medusa_num_layers=1), 16)
  w.save(tmp_path / "src")
  monkeypatch.setattr(_atomic, "_fsync", full)
  assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
  _assert_one_line_error(capsys.readouterr().err, f"{tmp_path / 'dst'}", "No space left on device")
  assert not (tmp_path / "dst").exists()


_TINY_TRAIN = os.path.join(REPO, "configs", "tiny.json")


@pytest.mark.parametrize("extra,needles", [
    (["--compare", "x"], ["--compare: needs --variant"]),
    (["--variant", "a:steps"], ["variant a: 'steps': expected key=value"]),
    (["--variant", "a", "--variant", "a"], ["--variant: each NAME once"]),
    (["--variant", "d:num_heads=3"], ["variant d: num_heads shape the shared rows"]),
    (["--variant", "u:stpes=3"], ["variant u: unknown keys ['stpes']"]),
])
def test_train_variant_errors_are_one_line_before_any_work(extra, needles, tmp_path, capsys):
  assert cli.main(["train", "--config", _TINY_TRAIN, "--workdir", str(tmp_path / "w")]
                  + extra) == 2
  _assert_one_line_error(capsys.readouterr().err, *needles)
  assert not (tmp_path / "w").exists()


def test_train_prompts_only_writes_the_prompts_and_stops(tiny_dirs, tmp_path, capsys):
  convs = [{"id": f"c{i}", "conversations": [
      {"from": "human", "value": f"question number {i}?"},
      {"from": "gpt", "value": f"answer {i}."}]} for i in range(6)]
  (tmp_path / "sharegpt.json").write_text(json.dumps(convs))
  (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "category": "x",
                                                "turns": ["question number 3?"]}) + "\n")
  work = tmp_path / "w"
  assert cli.main(["train", "--config", _TINY_TRAIN, "--prompts-only", "--workdir", str(work),
                   "--model-dir", tiny_dirs[0], "--sharegpt", str(tmp_path / "sharegpt.json"),
                   "--mtbench", str(tmp_path / "q.jsonl")]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out == {"prompts": str(work / "prompts.jsonl"), "count": 5}  # MT-bench's one excluded
  texts = [json.loads(line)["text"] for line in (work / "prompts.jsonl").read_text().splitlines()]
  assert sorted(texts) == sorted(f"question number {i}?" for i in range(6) if i != 3)
  assert sorted(p.name for p in work.iterdir()) == ["prompts.jsonl"]
