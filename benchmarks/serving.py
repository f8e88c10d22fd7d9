"""Serving many users from one base model (docs/serving.md): mixed-user decode, slot swaps, memory per resident
user, and the adapter store at scale. CPU numbers on a shared machine: load averages are printed with them.

    python -m benchmarks.serving decode             # tokens/s of model.generate, 1/8/64/512 distinct users
    python -m benchmarks.serving swap               # one user into a slot: VeRA vs LoRA r=16 of the same model
    python -m benchmarks.serving memory             # bytes per resident user
    python -m benchmarks.serving store --users 100000 --dir /some/disk/dir   # the store at scale

Decode: a small Llama (hidden 256, 4 layers, vocab 1024; random weights), VeRA rank 64 on every linear layer,
prompts of 8 tokens, 16 new tokens (greedy, KV cache), batches of 64 and 512 rows spread round robin over u
distinct users. Rows: ``vera one user`` (a single-adapter model, the cost to match), ``vera bank`` (banks of
512 slots under ``vk.adapter_ids``), ``peft lora r=16 mixed`` (PEFT LoRA with u adapters,
``generate(..., adapter_names=...)``), ``peft vera loop`` (PEFT VeRA, one ``generate`` per user on its rows).
Implementations run in turns; each cell is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import torch

import vera_kernels as vk

HIDDEN, LAYERS, VOCAB, RANK, LORA_RANK = 256, 4, 1024, 64, 16
PROMPT, NEW = 8, 16


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def llama(hidden=HIDDEN, layers=LAYERS, vocab=VOCAB):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomize(params, g):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (0.5 if p.dim() == 1 else 0.0))


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, use_cache=True, pad_token_id=0, **kw)


# --- decode -------------------------------------------------------------------------------------
SINGLE = "vera single-adapter model (one user)"
TARGET_USERS = 64  # the targets' rows: 64 distinct users in a batch
TARGET_VS_SINGLE = 1.10  # the bank's decode costs <= 1.10x the single-adapter model's
TARGET_VS_PEFT = 3.0  # the bank's throughput >= 3x PEFT's mixed-batch LoRA r=16


def decode(batches=(64, 512), users=(1, 8, 64, 512), repeats=3, peft_users=(64,), slots=512,
           hidden=HIDDEN) -> List[str]:
    """The decode table: every implementation against the single-adapter model (what one user would run
    otherwise) in the same batch, the PEFT rows also against the bank at the same number of users.

    With one thread, times are this process's CPU time (``time.process_time``): on a shared machine the
    time spent waiting for a core does not count, and every implementation runs on this one thread. With
    more threads, wall time."""
    clock, clock_name = ((time.process_time, "CPU time of the process") if torch.get_num_threads() == 1
                         else (time.perf_counter, "wall time"))
    g = torch.Generator().manual_seed(0)
    single = vk.apply_vera(llama(hidden), rank=RANK, seed=1).eval()
    _randomize([p for p in single.parameters() if p.requires_grad], g)
    bank = vk.apply_vera(llama(hidden), rank=RANK, seed=1, num_adapters=slots).eval()
    _randomize([p for p in bank.parameters() if p.requires_grad], g)
    plain = llama(hidden)
    lines = [f"decode: {load()}, {torch.get_num_threads()} thread(s), {clock_name}, medians of {repeats}",
             "| batch | distinct users | implementation | tokens/s | time / single-adapter model | "
             "vera bank's throughput / this | target |", "|---|---|---|---|---|---|---|"]
    peft_lora = peft_vera = None
    for B in batches:
        ids = torch.randint(1, VOCAB, (B, PROMPT), generator=g)
        cases: Dict[str, Callable] = {f"{SINGLE}|1": lambda: _generate(single, ids),
                                      "llama without adapters (the floor)|": lambda: _generate(plain, ids)}
        for u in users:
            if u > B:
                continue
            rows = torch.arange(B) % u

            def run_bank(rows=rows):
                with vk.adapter_ids(bank, rows):
                    return _generate(bank, ids)

            cases[f"vera bank ({slots} slots)|{u}"] = run_bank
            if u in peft_users:
                if peft_lora is None:
                    peft_lora = _peft_lora(max(peft_users), g, hidden)
                    peft_vera = _peft_vera(max(peft_users), g, hidden)
                names = [f"u{int(r)}" for r in rows]
                cases[f"peft lora r={LORA_RANK}, generate(adapter_names=...)|{u}"] = (
                    lambda names=names: _generate(peft_lora, ids, adapter_names=names))
                cases[f"peft vera, one generate per user|{u}"] = lambda u=u, rows=rows: _peft_loop(peft_vera, ids, rows, u)
        for fn in cases.values():  # warm up
            fn()
        times = {name: [] for name in cases}
        for _ in range(repeats):  # in turns, so the machine's load hits every implementation alike
            for name, fn in cases.items():
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        lines += _decode_rows(B, {name: statistics.median(ts) for name, ts in times.items()})
        lines.append(f"(batch {B} done: {load()})")
    return lines


def _decode_rows(B: int, t: Dict[str, float]) -> List[str]:
    """One table row per implementation: its time against the single-adapter model's, the PEFT rows' against
    the bank's at the same number of users, and the targets where a row has one."""
    t_single = t[f"{SINGLE}|1"]
    bank = {name.partition("|")[2]: v for name, v in t.items() if name.startswith("vera bank")}
    out = []
    for name, v in t.items():
        impl, _, u = name.partition("|")
        vs_bank, target = "", ""
        if impl.startswith("peft") and u in bank:
            vs_bank = f"{v / bank[u]:.1f}x"
        if u == str(TARGET_USERS) and impl.startswith("vera bank"):
            met = v / t_single <= TARGET_VS_SINGLE
            target = f"<= {TARGET_VS_SINGLE:.2f}x the single-adapter model: {'met' if met else 'MISSED'}"
        if u == str(TARGET_USERS) and impl.startswith("peft lora") and u in bank:
            met = v / bank[u] >= TARGET_VS_PEFT
            target = f"bank >= {TARGET_VS_PEFT:.0f}x its throughput: {'met' if met else 'MISSED'}"
        out.append(f"| {B} | {u or '-'} | {impl} | {B * NEW / v:,.0f} | {v / t_single:.2f}x | {vs_bank} | {target} |")
    return out


def _peft_lora(n, g, hidden):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(llama(hidden), peft.LoraConfig(r=LORA_RANK, target_modules="all-linear"),
                                     adapter_name="u0")
        for i in range(1, n):
            model.add_adapter(f"u{i}", peft.LoraConfig(r=LORA_RANK, target_modules="all-linear"))
    _randomize([p for n_, p in model.named_parameters() if "lora_B" in n_], g)
    return model.eval()


def _peft_vera(n, g, hidden):
    import peft

    cfg = dict(r=RANK, target_modules="all-linear", projection_prng_key=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(llama(hidden), peft.VeraConfig(**cfg), adapter_name="u0")
        for i in range(1, n):
            model.add_adapter(f"u{i}", peft.VeraConfig(**cfg))
    _randomize([p for n_, p in model.named_parameters() if "vera_lambda" in n_], g)
    return model.eval()


def _peft_loop(model, ids, rows, u):
    for a in range(u):
        model.set_adapter(f"u{a}")
        _generate(model, ids[rows == a])


# --- swap ---------------------------------------------------------------------------------------
def _read_flat(path: str, buffers: list, nbytes: int) -> None:
    """A one-tensor safetensors file's data read straight into ``buffers`` (the header parsed and checked,
    then one ``preadv``, or one ``readinto`` per buffer where there is no ``os.preadv``)."""
    import json
    import struct

    with open(path, "rb", buffering=0) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        (entry,) = [v for k, v in header.items() if k != "__metadata__"]
        assert entry["data_offsets"] == [0, nbytes]
        if hasattr(os, "preadv"):
            assert os.preadv(f.fileno(), buffers, 8 + n) == nbytes
        else:
            for b in buffers:
                f.readinto(b)


def swap(repeats=50, slots=8, hidden=HIDDEN, layers=LAYERS, rounds=7) -> List[str]:
    """One user brought into a resident slot, from a one-file-per-user store on disk and from memory.

    Every implementation runs ``repeats`` swaps per round, in turns, for ``rounds`` rounds; a cell is the
    median over the rounds of the mean CPU time of a swap (``time.process_time``: what the swap costs, user
    and kernel time, without the time spent waiting for a core of a loaded machine), then its wall time.
    VeRA: ``SlotCache.ids`` of a user not resident (every slot full, so it evicts one): the store's file
    opened, its header checked, its vectors read straight into the slot's rows of the bank tables (one
    ``preadv``). LoRA r=16, PEFT's resident adapter (the weights ``generate(adapter_names=...)`` uses)
    overwritten in place: "best" does the same as VeRA, one flat safetensors file per user whose data is
    read straight into the adapter's weights (one ``preadv`` into every A and B); "safetensors.load_file"
    reads a per-weight file as PEFT would save it, then copies each weight. From memory: VeRA one copy per
    vector length into the tables, LoRA one copy per weight.
    """
    import peft
    import safetensors.torch as st

    g = torch.Generator().manual_seed(0)
    lines = [f"swap: {load()}, {torch.get_num_threads()} thread(s); model: Llama hidden {hidden}, {layers} layers, "
             f"VeRA r={RANK} vs LoRA r={LORA_RANK} on every linear layer; median of {rounds} rounds of "
             f"{repeats} swaps: CPU time (wall time)", "| what | VeRA | LoRA r=16 | LoRA / VeRA |", "|---|---|---|---|"]
    bank = vk.apply_vera(llama(hidden, layers), rank=RANK, seed=1, num_adapters=slots).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(llama(hidden, layers), peft.LoraConfig(r=LORA_RANK, target_modules="all-linear"),
                                   adapter_name="slot0").eval()
    lora_params = {n: p for n, p in lora.named_parameters() if ".slot0." in n}
    lora_total = sum(p.numel() for p in lora_params.values())
    pool = slots + 8  # users cycled in order: with LRU over `slots` slots, every swap is a miss
    with tempfile.TemporaryDirectory() as tmp:
        store = vk.AdapterStore(os.path.join(tmp, "vera"), model=bank, durable=False)
        for u in range(pool):
            vectors = {name: (torch.rand(RANK, generator=g), torch.randn(m["out_features"], generator=g))
                       for name, m in store.modules.items()}
            store.put(f"user{u}", vectors)
            tensors = {n: torch.randn(p.shape, generator=g) for n, p in lora_params.items()}
            st.save_file(tensors, os.path.join(tmp, f"lora{u}.safetensors"))
            st.save_file({"weights": torch.cat([t.flatten() for t in tensors.values()])},
                         os.path.join(tmp, f"lora_flat{u}.safetensors"))
        cache = vk.SlotCache(bank, store)
        cache.ids([f"user{u}" for u in range(slots)])  # every slot full: each further user evicts one
        lora_buf = torch.empty(lora_total)
        lora_views, off = [], 0
        for p in lora_params.values():
            lora_views.append((p, lora_buf[off:off + p.numel()].view(p.shape)))
            off += p.numel()
        lora_rows = [memoryview(p.detach().numpy()).cast("B") for p in lora_params.values()]

        def vera_from_disk(u):
            cache.ids([f"user{u % pool}"])

        def lora_best(u):
            _read_flat(os.path.join(tmp, f"lora_flat{u % pool}.safetensors"), lora_rows, 4 * lora_total)

        @torch.no_grad()
        def lora_load_file(u):
            tensors = st.load_file(os.path.join(tmp, f"lora{u % pool}.safetensors"))
            for n, p in lora_params.items():
                p.copy_(tensors[n])

        vera_mem = store.read("user0")

        def vera_copy(u):  # what the cache does once the file is read: one copy per vector length
            cache._fill([u % slots], [f"mem{u}"], vera_mem)

        @torch.no_grad()
        def lora_copy(_):
            for p, v in lora_views:
                p.copy_(v)

        def peft_load(u):  # PEFT's own way: a new adapter from a directory, then the old one dropped
            name = f"x{u}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lora.load_adapter(peft_dir, adapter_name=name)
            lora.delete_adapter(name)

        lora.save_pretrained(os.path.join(tmp, "peft"), selected_adapters=["slot0"])
        peft_dir = os.path.join(tmp, "peft", "slot0")  # PEFT saves a non-"default" adapter in a subdirectory

        cases = {"vera disk": vera_from_disk, "lora best": lora_best, "lora load_file": lora_load_file,
                 "vera mem": vera_copy, "lora mem": lora_copy}
        cpu = {name: [] for name in cases}
        wall = {name: [] for name in cases}
        counter = slots
        for name, fn in cases.items():  # warm up
            fn(counter)
            counter += 1
        for _ in range(rounds):  # in turns, so the machine's load hits every implementation alike
            for name, fn in cases.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(repeats):
                    fn(counter)
                    counter += 1
                cpu[name].append((time.process_time() - c0) / repeats * 1e6)
                wall[name].append((time.perf_counter() - t0) / repeats * 1e6)

        def cell(name):
            return f"{statistics.median(cpu[name]):,.0f} us ({statistics.median(wall[name]):,.0f} us)"

        def ratio(a, b):
            return (f"{statistics.median(cpu[b]) / statistics.median(cpu[a]):.1f}x "
                    f"({statistics.median(wall[b]) / statistics.median(wall[a]):.1f}x)")

        lines += [f"| from the store on disk (read + copy into the slot), LoRA best | {cell('vera disk')} | "
                  f"{cell('lora best')} | {ratio('vera disk', 'lora best')} |",
                  f"| from disk, LoRA with safetensors.load_file | | {cell('lora load_file')} | "
                  f"{ratio('vera disk', 'lora load_file')} |",
                  f"| from memory (copy into the slot) | {cell('vera mem')} | {cell('lora mem')} | "
                  f"{ratio('vera mem', 'lora mem')} |"]
        t0 = time.perf_counter()
        for u in range(3):
            peft_load(u)
        lines.append(f"| PEFT load_adapter + delete_adapter (LoRA) | | {(time.perf_counter() - t0) / 3 * 1e6:,.0f} us | |")
        vb = os.path.getsize(store.path("user0"))
        lb = os.path.getsize(os.path.join(tmp, "lora_flat0.safetensors"))
        lines.append(f"| file per user | {vb:,} B | {lb:,} B | {lb / vb:.1f}x |")
    lines.append(f"({load()})")
    return lines


# --- memory -------------------------------------------------------------------------------------
def memory(slots=512, hidden=HIDDEN) -> List[str]:
    bank = vk.apply_vera(llama(hidden), rank=RANK, seed=1, num_adapters=slots)
    layers = vk.models.vera_layers(bank).values()
    vera = sum((l.lambda_d[0].numel() + l.lambda_b[0].numel()) * 4 for l in layers)
    lora = sum(LORA_RANK * (l.in_features + l.out_features) * 4 for l in layers)
    total = sum(l.lambda_d.numel() * 4 + l.lambda_b.numel() * 4 for l in layers)
    return [f"memory per resident user (float32), Llama hidden {hidden}, {LAYERS} layers, every linear layer:",
            f"VeRA r={RANK}: {vera:,} B per slot ({total:,} B for {slots} slots; the projection regenerated from "
            f"its seed, 0 B per user);  LoRA r={LORA_RANK}: {lora:,} B ({lora / vera:.1f}x)"]


# --- store --------------------------------------------------------------------------------------
def store_at_scale(users: int, directory: str, durable_sample: int = 2000, gets: int = 5000) -> List[str]:
    """A store of ``users`` users of the tiny Llama of examples/serve_users.py (hidden 64, 2 layers, rank 16)."""
    import random

    model = vk.apply_vera(llama(hidden=64, layers=2, vocab=256), rank=16, seed=1, num_adapters=2)
    fast = vk.AdapterStore(directory, model=model, durable=False)
    durable = vk.AdapterStore(directory, durable=True)
    g = torch.Generator().manual_seed(0)
    vectors = {name: (torch.rand(16, generator=g), torch.randn(m["out_features"], generator=g))
               for name, m in fast.modules.items()}
    lines = [f"store: {users:,} users of a tiny Llama (hidden 64, 2 layers, 14 VeRA layers, rank 16); {load()}"]
    put_fast, put_durable = [], []
    t_all = time.perf_counter()
    for u in range(users):
        s = durable if u < durable_sample else fast
        t0 = time.perf_counter()
        s.put(f"user{u}", vectors)
        (put_durable if u < durable_sample else put_fast).append(time.perf_counter() - t0)
    t_all = time.perf_counter() - t_all
    rnd = random.Random(0)
    get_t = []
    for _ in range(gets):
        key = f"user{rnd.randrange(users)}"
        t0 = time.perf_counter()
        fast.get(key)
        get_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = len(fast)
    t_len = time.perf_counter() - t0
    t0 = time.perf_counter()
    k = sum(1 for _ in fast.keys())
    t_keys = time.perf_counter() - t0
    assert n == k == users
    sizes, blocks = 0, 0
    for root, _, files in os.walk(directory):
        for f in files:
            st_ = os.stat(os.path.join(root, f))
            sizes += st_.st_size
            blocks += st_.st_blocks * 512
    dirs = sum(os.stat(os.path.join(directory, "users", d)).st_blocks * 512
               for d in os.listdir(os.path.join(directory, "users")))

    def q(ts, p):
        ts = sorted(ts)
        return ts[min(len(ts) - 1, int(p * len(ts)))] * 1e6

    lines += [
        f"bytes per user: {sizes / users:,.0f} B of file, {(blocks + dirs) / users:,.0f} B on disk (4 KiB blocks, "
        f"shard directories included)",
        f"put (fsync, first {durable_sample}): median {q(put_durable, .5):,.0f} us, p99 {q(put_durable, .99):,.0f} us",
        f"put (no fsync, the rest): median {q(put_fast, .5):,.0f} us, p99 {q(put_fast, .99):,.0f} us; "
        f"all {users:,} puts {t_all:.0f} s",
        f"get ({gets} random users, warm page cache): median {q(get_t, .5):,.0f} us, p99 {q(get_t, .99):,.0f} us",
        f"len(store) (lists 256 shard directories): {t_len * 1e3:,.0f} ms; keys() (lists them, keys from the file "
        f"names): {t_keys:,.2f} s",
        f"({load()})",
    ]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "swap", "memory", "store", "all"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size of the decode/swap/memory model")
    ap.add_argument("--layers", type=int, default=LAYERS, help="layers of the swap model")
    ap.add_argument("--dir", default=None, help="store directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []
    if args.what in ("memory", "all"):
        out += memory(hidden=args.hidden)
    if args.what in ("swap", "all"):
        out += swap(hidden=args.hidden, layers=args.layers)
    if args.what in ("decode", "all"):
        out += decode(repeats=args.repeats, hidden=args.hidden)
    if args.what == "store":
        if args.dir:
            out += store_at_scale(args.users, args.dir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out += store_at_scale(args.users, tmp)
    print("\n".join(out))


if __name__ == "__main__":
    main()
