"""What the Triton kernels compile to for an H100 (sm_90), checked without a GPU (benchmarks/sass_report.py).

The interpreter proves the kernels right but says nothing about how they compile. These tests compile them for sm_90
with the ptxas that ships with Triton and read the machine code for the structure that decides speed on a GPU:
16-byte vector loads and stores, asynchronous copies into shared memory (software pipelining), tensor-core MMAs, and
no register spills. Before the launcher passed strides in units of their alignment, head dim 40 (SD1.5's 4096-token
attention) compiled to one 2-byte load per element, no asynchronous copies and 56 bytes of stack spills.
"""
import json
import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(
    not all(os.path.exists(os.path.join(TOOLS, tool)) for tool in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="this Triton ships no NVIDIA tools (ptxas, cuobjdump, nvdisasm) to compile for sm_90 with",
)


def sass_report(kernel):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_report.py"), "--json",
                             "--kernel", kernel], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["rows"]


@pytest.fixture(scope="module")
def attention_rows():
    return sass_report("attention")


def test_attention_covers_the_sd_head_dims(attention_rows):
    head_dims = {row["constexprs"]["HEAD_DIM"] for row in attention_rows}
    assert {40, 64, 80, 160} <= head_dims


def test_attention_moves_memory_in_16_byte_vectors(attention_rows):
    """Every global load, asynchronous copy and store is 128 bits wide, at every SD head dim, self and cross."""
    for row in attention_rows:
        memory = {op: n for op, n in row["instructions"].items() if op.split(".")[0] in ("LDG", "LDGSTS", "STG")}
        narrow = {op: n for op, n in memory.items() if not op.endswith(".128")}
        assert memory and not narrow, f"{row['case']}: narrow memory instructions {narrow}"


def test_attention_pipelines_loads_and_uses_tensor_cores(attention_rows):
    for row in attention_rows:
        ops = row["instructions"]
        assert any(op.startswith("LDGSTS") for op in ops), f"{row['case']}: no asynchronous copies (not pipelined)"
        assert any(op.startswith(("HGMMA", "HMMA")) for op in ops), f"{row['case']}: no tensor-core MMA"


def test_attention_does_not_spill(attention_rows):
    for row in attention_rows:
        assert row["stack_bytes"] == 0, f"{row['case']}: {row['stack_bytes']} bytes of stack (register spills)"


@pytest.fixture(scope="module")
def group_norm_rows():
    return sass_report("group_norm_silu")


def test_group_norm_never_stores_one_element_at_a_time(group_norm_rows):
    """Outputs go out at least 4 bytes at a time in both layouts. In channels_last a group's C/G channels are the
    contiguous run: with C/G a compile-time constant the compiler vectorises it (2-byte stores before, at SD's
    C/G of 10, 20 and 40)."""
    for row in group_norm_rows:
        stores = [op for op in row["instructions"] if op.startswith("STG")]
        assert stores and "STG.E.U16" not in stores, f"{row['case']}: {stores}"


def test_group_norm_channels_last_loads_are_vectors(group_norm_rows):
    for row in group_norm_rows:
        if row["constexprs"]["CHANNELS_LAST"]:
            assert "LDG.E.U16" not in row["instructions"], f"{row['case']}: {row['instructions']}"


def test_group_norm_nchw_reads_weight_and_bias_once_per_block(group_norm_rows):
    """NCHW with H*W a multiple of the block: two scalar loads (weight, bias) a block, not a gather per element."""
    per_block = [row for row in group_norm_rows if row["constexprs"]["CHANNEL_PER_BLOCK"]]
    assert per_block
    for row in per_block:
        assert row["instructions"].get("LDG.E.U16", 0) <= 2, f"{row['case']}: {row['instructions']}"
