"""Serve many users' VeRA adapters from one base model: an adapter store, bank slots swapped, mixed batches.

    python examples/serve_users.py                       # 1000 users, 32 slots, 256 requests
    python examples/serve_users.py --users 100000 --slots 256 --batch 64

A tiny Llama (built from a config, random weights) gets banks of ``--slots`` adapters in every linear layer.
``--users`` users' adapters (random vectors standing in for trained ones) go into a ``vk.AdapterStore``.
Requests arrive from random users (a few popular users, a long tail, and some anonymous requests served
by the base model alone); each batch takes the next ``--batch`` requests, ``vk.SlotCache`` brings its
users into slots (evicting the least recently used), and ``model.generate`` decodes every row with its
own user's adapter. Prints throughput, swaps and the slot hit rate; ``--check`` also regenerates a few
rows with each user's own single-adapter model and checks the tokens are the same.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import vera_kernels as vk

PAD = 0


def tiny_llama(vocab: int = 256):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def fill_store(store: vk.AdapterStore, users: int, rank: int) -> float:
    """Put ``users`` users with random vectors; returns the seconds it took."""
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for u in range(users):
        store.put(f"user{u}", {name: (torch.rand(rank, generator=g) + 0.5, torch.randn(m["out_features"], generator=g))
                               for name, m in store.modules.items()})
    return time.perf_counter() - t0


def request_stream(n: int, users: int, vocab: int, anonymous: float, seed: int = 2):
    """``n`` requests ``(user or None, prompt)``: users drawn with Zipf-like popularity (weight 1/rank)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, users + 1, dtype=torch.float64)
    for _ in range(n):
        if torch.rand((), generator=g).item() < anonymous:
            user = None
        else:
            user = f"user{int(torch.multinomial(weights, 1, generator=g))}"
        length = int(torch.randint(4, 13, (), generator=g))
        yield user, torch.randint(1, vocab, (length,), generator=g)


def left_pad(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


def generate(model, ids, mask, new_tokens):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def alone(store: vk.AdapterStore, user, rank: int, seed: int):
    """The user's own single-adapter model (the base model for None), for --check."""
    model = tiny_llama()
    if user is None:
        return model
    model = vk.apply_vera(model, rank=rank, seed=seed).eval()
    with torch.no_grad():
        for name, (d, b) in store.get(user).items():
            model.get_submodule(name).lambda_d.copy_(d)
            model.get_submodule(name).lambda_b.copy_(b)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=32, help="adapters resident in the model (num_adapters)")
    ap.add_argument("--batch", type=int, default=16, help="requests per batch (at most --slots)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--anonymous", type=float, default=0.1, help="share of requests served by the base model")
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", type=int, default=0, metavar="N", help="check N rows against their user alone")
    args = ap.parse_args(argv)
    if args.batch > args.slots:
        ap.error("--batch must be at most --slots (a batch's distinct users must fit in the slots)")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed = 1234
    model = vk.apply_vera(tiny_llama(), rank=args.rank, seed=seed, num_adapters=args.slots).eval()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.store or os.path.join(tmp, "store")
        store = vk.AdapterStore(directory, model=model, durable=False)
        if len(store) < args.users:
            took = fill_store(store, args.users, args.rank)
            print(f"store: {args.users} users put in {took:.2f} s ({args.users / took:.0f} puts/s, no fsync) "
                  f"at {directory}")
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)
        print(f"store: {len(store)} users, {size / len(store):.0f} bytes per user on disk (file sizes)")
        slots = vk.SlotCache(model, store)
        print(f"model: tiny Llama, {len(vk.models.vera_layers(model))} VeRA layers, rank {args.rank}, "
              f"{args.slots} slots; batches of {args.batch}, {args.new_tokens} new tokens per request")

        requests = list(request_stream(args.requests, args.users, model.config.vocab_size, args.anonymous))
        tokens, swap_s, batches, checks = 0, 0.0, 0, []
        t0 = time.perf_counter()
        for start in range(0, len(requests), args.batch):
            batch = requests[start:start + args.batch]
            users = [u for u, _ in batch]
            t_swap = time.perf_counter()
            ids = slots.ids(users)
            swap_s += time.perf_counter() - t_swap
            input_ids, mask = left_pad([p for _, p in batch])
            with vk.adapter_ids(model, ids):
                out = generate(model, input_ids, mask, args.new_tokens)
            tokens += out.numel()
            batches += 1
            if len(checks) < args.check:
                checks.append((users[0], input_ids[:1], mask[:1], out[0]))
        elapsed = time.perf_counter() - t0
        print(f"served {len(requests)} requests in {batches} batches: {tokens} tokens in {elapsed:.2f} s "
              f"({tokens / elapsed:.0f} tokens/s)")
        print(f"slots: {slots.misses} users loaded, {slots.evictions} evicted, hit rate {slots.hit_rate:.1%} "
              f"(per distinct user of a batch), {swap_s * 1e3:.1f} ms in slot loading "
              f"({swap_s / max(slots.misses, 1) * 1e6:.0f} us per user loaded)")
        for user, input_ids, mask, got in checks:
            want = generate(alone(store, user, args.rank, seed), input_ids, mask, args.new_tokens)[0]
            same = torch.equal(got, want)
            print(f"check {user}: {'matches' if same else 'DIFFERS FROM'} its own model alone")
            if not same:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
