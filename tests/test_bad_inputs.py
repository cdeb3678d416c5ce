"""Every op rejects bad input with an error naming the argument; none crashes or writes."""
import pytest
import torch

from conftest import needs_gpu

from snapkv_ext import ops


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def cases(device):
    q, k, v = t(1, 4, 8, 64, device=device), t(1, 2, 50, 64, device=device), t(1, 2, 50, 64, device=device)
    s = t(1, 2, 42, device=device)
    idx = torch.arange(10, device=device).expand(1, 2, 10).contiguous()
    return [
        ("q_window must be [B, H_q, w, D]", lambda: ops.window_scores(q[0], k)),
        ("keys must be [B, H_kv, L, D]", lambda: ops.window_scores(q, k[0])),
        ("same dtype", lambda: ops.window_scores(q, k.double().float().half())),
        ("float32, float16 or bfloat16", lambda: ops.window_scores(q.long(), k.long())),
        ("float32, float16 or bfloat16", lambda: ops.window_scores(q.double(), k.double())),
        ("multiple of H_kv", lambda: ops.window_scores(t(1, 3, 8, 64, device=device), k)),
        ("same head dim", lambda: ops.window_scores(t(1, 4, 8, 32, device=device), k)),
        ("same batch size", lambda: ops.window_scores(t(2, 4, 8, 64, device=device), k)),
        ("must be smaller than L", lambda: ops.window_scores(t(1, 4, 50, 64, device=device), k)),
        ("non-empty", lambda: ops.window_scores(t(1, 4, 8, 0, device=device), t(1, 2, 50, 0, device=device))),
        ("pad_lengths values must be in [0, L - w", lambda: ops.window_scores(q, k, torch.tensor([43], device=device))),
        ("pad_lengths values must be in [0, L - w", lambda: ops.window_scores(q, k, torch.tensor([-1], device=device))),
        ("pad_lengths must be [B]", lambda: ops.window_scores(q, k, torch.tensor([1, 2], device=device))),
        ("pad_lengths must be int64", lambda: ops.window_scores(q, k, torch.tensor([1.0], device=device))),
        ("group_reduce must be", lambda: ops.window_scores(q, k, group_reduce="median")),
        ("scale must be finite and positive", lambda: ops.window_scores(q, k, scale=-1.0)),
        ("softcap must be None or finite and positive, got 0", lambda: ops.window_scores(q, k, softcap=0.0)),
        ("softcap must be None or finite and positive, got -1", lambda: ops.window_scores(q, k, softcap=-1.0)),
        ("softcap must be None or finite and positive, got nan",
         lambda: ops.window_scores(q, k, softcap=float("nan"))),
        ("softcap must be None or finite and positive, got inf",
         lambda: ops.window_scores(q, k, softcap=float("inf"))),
        ("softcap must be None or finite and positive, got 1e-50",  # 0 as the kernels' float
         lambda: ops.window_scores(q, k, softcap=1e-50)),
        ("softcap must be None or finite and positive, got 1e+300",  # inf as the kernels' float
         lambda: ops.window_scores(q, k, softcap=1e300)),
        ("softcap must be None or finite and positive, got 0",
         lambda: ops.snapkv_compress(q, k, v, 32, softcap=0.0)),
        ("softcap must be None or finite and positive, got -1",
         lambda: ops.snapkv_compress(q, k, v, 64, softcap=-1.0)),  # L <= capacity: checked all the same
        ("softcap must be None or finite and positive, got nan",
         lambda: ops.snapkv_compress_into(q, k, v, 32, t(1, 2, 32, 64, device=device), t(1, 2, 32, 64, device=device),
                                          softcap=float("nan"))),
        ("kernel_size must be a positive odd", lambda: ops.pool_scores(s, 4)),
        ("kernel_size must be a positive odd", lambda: ops.pool_scores(s, 0)),
        ("kernel_size must be a positive odd", lambda: ops.pool_scores(s, -3)),
        ("pooling must be 'max' or 'avg'", lambda: ops.pool_scores(s, 3, "min")),
        ("scores must be [B, H, N]", lambda: ops.pool_scores(s[0], 3)),
        ("scores must be non-empty", lambda: ops.pool_scores(t(1, 2, 0, device=device), 3)),
        ("float32, float16 or bfloat16", lambda: ops.pool_scores(s.long(), 3)),
        ("k must be in [0, N", lambda: ops.select_topk(s, 43)),
        ("k must be in [0, N", lambda: ops.select_topk(s, -1)),
        ("scores must be non-empty", lambda: ops.select_topk(t(1, 2, 0, device=device), 0)),
        ("window_size must be in [1, L - 1]", lambda: ops.compact(k, v, idx, 50)),
        ("window_size must be in [1, L - 1]", lambda: ops.compact(k, v, idx, 0)),
        ("indices must lie in [0, L - window_size)", lambda: ops.compact(k, v, idx + 35, 8)),
        ("indices must lie in [0, L - window_size)", lambda: ops.compact(k, v, idx - 1, 8)),
        ("indices must be int64", lambda: ops.compact(k, v, idx.int(), 8)),
        ("indices must be [B, H_kv, k]", lambda: ops.compact(k, v, idx[0], 8)),
        ("values must have the shape of keys", lambda: ops.compact(k, v[:, :1], idx, 8)),
        ("values must have the dtype of keys", lambda: ops.compact(k, v.half(), idx, 8)),
        ("keys_out must be [B, H_kv, k + w, D]",
         lambda: ops.compact_into(k, v, idx, 8, t(1, 2, 17, 64, device=device), t(1, 2, 18, 64, device=device))),
        ("values_out must have the dtype of keys",
         lambda: ops.compact_into(k, v, idx, 8, t(1, 2, 18, 64, device=device), t(1, 2, 18, 64, device=device).half())),
        ("must be contiguous in its last dim",
         lambda: ops.compact_into(k, v, idx, 8, t(1, 2, 64, 18, device=device).transpose(2, 3), t(1, 2, 18, 64, device=device))),
        ("max_capacity_prompt must be larger than the window", lambda: ops.snapkv_compress(q, k, v, 8)),
        ("kernel_size must be a positive odd", lambda: ops.snapkv_compress(q, k, v, 32, 6)),
        ("pooling must be 'max' or 'avg'", lambda: ops.snapkv_compress(q, k, v, 32, 7, "sum")),
        ("values must have the shape of keys", lambda: ops.snapkv_compress(q, k, v[:, :, :40], 32)),
        ("must not share memory with the input keys or values",
         lambda: ops.compact_into(k, v, idx, 8, k[:, :, :18], t(1, 2, 18, 64, device=device))),
        ("keys_out and values_out must not share memory",
         lambda: (lambda b: ops.compact_into(k, v, idx, 8, b[:, :, :18], b[:, :, 18:]))(t(1, 2, 36, 64, device=device))),
        ("keys_out must be [B, H_kv, min(L, max_capacity_prompt), D]",
         lambda: ops.snapkv_compress_into(q, k, v, 32, t(1, 2, 31, 64, device=device), t(1, 2, 32, 64, device=device))),
        ("values_out must be [B, H_kv, min(L, max_capacity_prompt), D]",
         lambda: ops.snapkv_compress_into(q, k, v, 64, t(1, 2, 50, 64, device=device), t(1, 2, 64, 64, device=device))),
        ("values_out must not share memory with the input keys or values",
         lambda: ops.snapkv_compress_into(q, k, v, 32, t(1, 2, 32, 64, device=device), v[:, :, 10:42])),
        ("max_capacity_prompt must be larger than the window",
         lambda: ops.snapkv_compress_into(q, k, v, 8, t(1, 2, 8, 64, device=device), t(1, 2, 8, 64, device=device))),
        *ragged_cases(device),
    ]


def ragged_cases(device):
    q, kv = t(1, 4, 1, 64, device=device), t(20, 64, device=device)
    st = torch.tensor([[0, 10]], device=device)
    ln = torch.tensor([[5, 10]], device=device)
    ra = ops.ragged_attention
    return [
        ("q must be [B, H_q, n, D]", lambda: ra(q[0], kv, kv, st, ln, 0.1)),
        ("keys must be [N, D]", lambda: ra(q, kv[None], kv, st, ln, 0.1)),
        ("values must be [N, D]", lambda: ra(q, kv, kv[None], st, ln, 0.1)),
        ("q must be float32, float16 or bfloat16", lambda: ra(q.double(), kv.double(), kv.double(), st, ln, 0.1)),
        ("keys and values must have the dtype of q", lambda: ra(q, kv.half(), kv, st, ln, 0.1)),
        ("keys and values must have the dtype of q", lambda: ra(q, kv, kv.bfloat16(), st, ln, 0.1)),
        ("q must be non-empty", lambda: ra(t(1, 4, 0, 64, device=device), kv, kv, st, ln, 0.1)),
        ("keys must be [N, D] with the head dim of q", lambda: ra(q, kv[:, :32], kv[:, :32], st, ln, 0.1)),
        ("values must have the shape of keys", lambda: ra(q, kv, kv[:10], st, ln, 0.1)),
        ("q must be contiguous in its last dim", lambda: ra(t(1, 4, 64, 2, device=device).transpose(2, 3)[:, :, :1], kv, kv, st,
                                                            ln, 0.1)),
        ("keys must have contiguous rows", lambda: ra(q, t(64, 20, device=device).t(), kv, st, ln, 0.1)),
        ("values must have contiguous rows", lambda: ra(q, kv, t(64, 20, device=device).t(), st, ln, 0.1)),
        ("starts must be int64", lambda: ra(q, kv, kv, st.int(), ln, 0.1)),
        ("lengths must be int64", lambda: ra(q, kv, kv, st, ln.float(), 0.1)),
        ("starts must be [B, H_kv]", lambda: ra(q, kv, kv, st[0], ln[0], 0.1)),
        ("starts must be [B, H_kv]", lambda: ra(q, kv, kv, st.expand(2, 2), ln.expand(2, 2), 0.1)),
        ("lengths must have the shape of starts", lambda: ra(q, kv, kv, st, ln[:, :1], 0.1)),
        ("H_q must be a multiple of H_kv", lambda: ra(t(1, 3, 1, 64, device=device), kv, kv, st, ln, 0.1)),
        ("scale must be finite and positive", lambda: ra(q, kv, kv, st, ln, 0.0)),
        ("scale must be finite and positive", lambda: ra(q, kv, kv, st, ln, float("nan"))),
        ("softcap must be None or finite and positive, got -1", lambda: ra(q, kv, kv, st, ln, 0.1, -1.0)),
        ("lengths must be >= n", lambda: ra(t(1, 4, 6, 64, device=device), kv, kv, st, ln, 0.1)),
        ("lengths must be >= n", lambda: ra(q, kv, kv, st, ln * 0, 0.1)),
        ("segments must lie in the store", lambda: ra(q, kv, kv, st + 1, ln, 0.1)),
        ("segments must lie in the store", lambda: ra(q, kv, kv, st - 1, ln, 0.1)),
    ]


CASE_IDS = [f"{i}-{c[0][:30]}" for i, c in enumerate(cases("cpu"))]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_message(device, case):
    message, call = cases(device)[case]
    with pytest.raises(RuntimeError, match="snapkv: .*" + __import__("re").escape(message)):
        call()


# What needs tensor values or memory (pad_lengths and indices in range, outputs that overlap) is
# checked at run time only; the fakes cannot see it.
RUN_TIME_ONLY = ("pad_lengths values must be in", "indices must lie in", "share memory", "lengths must be >= n",
                 "segments must lie in the store")


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input_message_on_meta(case):
    """The fake implementations (what torch.compile traces with) reject the same calls with the
    same messages, on meta tensors; the value checks they cannot do let the call through."""
    message, call = cases("meta")[case]
    if any(m in message for m in RUN_TIME_ONLY):
        call()
        return
    with pytest.raises(RuntimeError, match="snapkv: .*" + __import__("re").escape(message)):
        call()


def test_compact_into_untouched_on_error(device):
    k = t(1, 2, 50, 64, device=device)
    idx = torch.full((1, 2, 10), 99, device=device)
    ko, vo = torch.zeros(1, 2, 18, 64, device=device), torch.zeros(1, 2, 18, 64, device=device)
    with pytest.raises(RuntimeError, match="indices must lie"):
        ops.compact_into(k, k.clone(), idx, 8, ko, vo)
    assert (ko == 0).all() and (vo == 0).all()


def test_compress_into_untouched_on_error(device):
    q, k = t(1, 4, 8, 64, device=device), t(1, 2, 50, 64, device=device)
    ko, vo = torch.zeros(1, 2, 32, 64, device=device), torch.zeros(1, 2, 32, 64, device=device)
    with pytest.raises(RuntimeError, match="kernel_size"):
        ops.snapkv_compress_into(q, k, k.clone(), 32, ko, vo, kernel_size=4)
    assert (ko == 0).all() and (vo == 0).all()


@needs_gpu
def test_device_mismatch():
    q, k = t(1, 4, 8, 64), t(1, 2, 50, 64, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        ops.window_scores(q, k)
