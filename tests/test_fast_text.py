"""trafficvlm.fast_text: the eval's decoder loop over its own KV buffer equals transformers' forward with a
DynamicCache (prefix, then branch chunks with crops between them), through buffer growth, compiled and
eager, in bf16 and with FP8 linears; the engine gives the same answers with it on or off; bad masks are
refused. Tiny random model in float32 on a CPU; ~30 s."""

from __future__ import annotations

import pytest
import torch

from test_eval_prefix import SYSTEM, _clip, _records
from trafficvlm.config import VideoSpec
from trafficvlm.evaluate import LocalEngine
from trafficvlm.fast_text import TextRunner, layer_step
from trafficvlm.model import build_tiny, load_model, load_processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def processor(tiny):
    return load_processor(tiny)


def _prepared(model, processor, n=5, batch=3):
    engine = LocalEngine(model, processor, VideoSpec(fps=4.0), SYSTEM, question_batch=batch, fast_text=False)
    return engine, engine.prepare([(_records(n), _clip())])[0]


def _hf_rows(engine, p):
    """transformers' forward: the prefix into a DynamicCache, each chunk on it, cropped back between."""
    with torch.inference_mode():
        _, cache = engine._forward(p.prefix.input_ids[None], p.prefix.position_ids[:, None], None, cache=None,
                                   vision=p.vision)
        out = []
        for chunk in p.branches:
            hidden, _ = engine._forward(chunk.input_ids, chunk.position_ids, chunk.mask, cache=cache)
            out.append(hidden[0, chunk.ends])
            cache.crop(-chunk.input_ids.shape[1])
    return out


def _runner_rows(runner, p):
    with torch.inference_mode():
        runner.prefill(p.prefix.input_ids[None], p.prefix.position_ids[:, None], p.vision)
        out = []
        for chunk in p.branches:
            out.append(runner.extend(chunk.input_ids, chunk.position_ids, chunk.mask, rows=chunk.ends))
            runner.crop(len(p.prefix))
            assert runner.get_seq_length() == len(p.prefix)
    return out


def test_runner_equals_transformers_forward_through_buffer_growth(model, processor):
    engine, p = _prepared(model, processor)
    assert len(p.branches) == 2
    runner = TextRunner(model)
    runner.block = 16  # reallocates during the prefix and again during a branch chunk
    ours, ref = _runner_rows(runner, p), _hf_rows(engine, p)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert runner.keys[0].shape[2] % 16 == 0 and runner.keys[0].shape[2] >= len(p.prefix) + p.branches[0].input_ids.shape[1]
    again = _runner_rows(runner, p)  # a second clip on the same buffer: prefill resets it
    for a, b in zip(again, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_static_branches_equal_the_plain_ones(model, processor):
    """The CUDA-graph path's padding (row to a multiple of row_step, start rounded up, padding rows seeing
    only themselves) changes nothing; here it runs without a graph, as on any CPU."""
    _, p = _prepared(model, processor)
    plain = _runner_rows(TextRunner(model), p)
    runner = TextRunner(model, static=True)
    runner.start_step, runner.row_step = 32, 16
    assert not runner.graphs  # no CUDA here: the padded pass runs, nothing is captured
    for _ in range(2):  # the second clip reuses the static buffers of the first
        for a, b in zip(_runner_rows(runner, p), plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert runner.shapes
    for start, width, rows in runner.shapes:
        assert start % 32 == 0 and len(p.prefix) <= start < len(p.prefix) + 32
        assert width % 16 == 0 and rows % 16 == 0


def test_a_failed_graph_capture_falls_back_to_uncaptured_branches(model, processor, monkeypatch, capsys):
    _, p = _prepared(model, processor)
    plain = _runner_rows(TextRunner(model), p)
    runner = TextRunner(model, static=True)
    runner.graphs = True  # as on CUDA; the capture itself is made to fail the way an uncapturable kernel does

    def refuse(st, start):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", refuse)
    for a, b in zip(_runner_rows(runner, p), plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not runner.graphs
    assert capsys.readouterr().err.count("CUDA graph capture of the question branches failed") == 1


def test_compiled_step_traces_into_one_graph_and_matches_eager(model, processor):
    """fullgraph: the cache write, the attention and the MLP trace without a break (aot_eager keeps the CPU
    test quick; CUDA runs Inductor on the same graph)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, p = _prepared(model, processor)
    runner = TextRunner(model)
    runner.step = torch.compile(layer_step, dynamic=True, fullgraph=True, backend="aot_eager")
    eager = _runner_rows(TextRunner(model), p)
    for a, b in zip(_runner_rows(runner, p), eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _runner_rows(runner, p)
    # one graph for prefixes and one for branches, shared by both layers (not one per layer or per length)
    assert counters["stats"]["unique_graphs"] == 2


def _cpu_rowwise_scaled_mm() -> bool:
    """torch >= 2.12 runs row-wise scaled_mm on a CPU (the CI's torch); 2.11 has per-tensor scales only."""
    from trafficvlm.fp8_linear import FP8

    a, b = torch.zeros(16, 16, dtype=FP8), torch.zeros(16, 16, dtype=FP8)
    try:
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_rowwise_scaled_mm(), reason="this torch has no row-wise FP8 scaled_mm on CPU")
def test_compiled_step_with_fp8_linears_matches_eager(tiny, processor):
    from trafficvlm.fp8_linear import Fp8RowwiseLinear, convert_linears

    torch._dynamo.reset()
    model = load_model(tiny, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    names = {n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    convert_linears(model.model.language_model, names)
    assert any(isinstance(m, Fp8RowwiseLinear) for m in model.modules())
    _, p = _prepared(model, processor)
    runner = TextRunner(model)
    runner.step = torch.compile(layer_step, dynamic=True, fullgraph=True, backend="aot_eager")
    eager = _runner_rows(TextRunner(model), p)
    for a, b in zip(_runner_rows(runner, p), eager):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_engine_answers_are_the_same_with_and_without_the_runner(model, processor):
    groups = [(_records(5), _clip())]
    spec = VideoSpec(fps=4.0)
    ours = LocalEngine(model, processor, spec, SYSTEM, question_batch=3).score(groups)[0]
    ref = LocalEngine(model, processor, spec, SYSTEM, question_batch=3, fast_text=False).score(groups)[0]
    assert [a.predicted for a in ours] == [a.predicted for a in ref]
    for a, b in zip(ours, ref):
        for k in a.letter_probs:
            assert abs(a.letter_probs[k] - b.letter_probs[k]) < 1e-5


def test_the_runner_is_used_only_where_it_applies(model, processor):
    spec = VideoSpec(fps=4.0)
    assert LocalEngine(model, processor, spec, SYSTEM).text is not None
    assert LocalEngine(model, processor, spec, SYSTEM, mode="generate").text is None
    assert LocalEngine(model, processor, spec, SYSTEM, branches=False).text is None
    assert LocalEngine(model, processor, spec, SYSTEM, blind=True).text is None
    assert LocalEngine(model, processor, spec, SYSTEM, shared_prefix=False).text is None
    assert LocalEngine(model, processor, spec, SYSTEM).text.step is layer_step  # not compiled on a CPU


def test_bad_masks_and_a_second_prefix_are_refused(model, processor):
    _, p = _prepared(model, processor)
    runner = TextRunner(model)
    chunk = p.branches[0]
    with torch.inference_mode():
        runner.prefill(p.prefix.input_ids[None], p.prefix.position_ids[:, None], p.vision)
        with pytest.raises(ValueError, match=r"mask covers .* expected"):
            runner.extend(chunk.input_ids, chunk.position_ids, chunk.mask[..., 1:])
        with pytest.raises(ValueError, match="must start an empty cache"):
            runner._layers(runner._embed(chunk.input_ids, None), chunk.position_ids, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and Inductor on CUDA need a GPU")
def test_cuda_graph_branches_equal_eager_on_a_gpu(tiny, processor):
    """What eval runs on a GPU: the compiled step, branches captured once per padded shape and replayed
    for later clips, against the eager loop (bf16); clips of two lengths and two question counts, so
    several shapes are captured and each is replayed."""
    torch._dynamo.reset()
    model = load_model(tiny, dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa").eval()
    engine = LocalEngine(model, processor, VideoSpec(fps=4.0), SYSTEM, question_batch=3, fast_text=False)
    clips = [engine.prepare([(_records(n), _clip(frames=f))])[0] for n, f in ((5, 6), (4, 10))]
    for p in clips:
        p.vision = {k: v.to("cuda") for k, v in p.vision.items()}
    eager = [_runner_rows(TextRunner(model), p) for p in clips]
    runner = TextRunner(model, compile=True, graphs=True)
    for _ in range(2):  # capture, then replay
        for p, ref in zip(clips, eager):
            for a, b in zip(_runner_rows(runner, p), ref):
                torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    assert len(runner.shapes) >= 2 and all(st.graph is not None for st in runner.shapes.values())
