"""A writer process for the store tests: ``python store_writer.py DIR MODE USERS``.

Every put writes version ``v`` of user ``u`` as vectors filled with one value, ``value(u, v)``, so a reader
can tell a whole version from a torn one. Modes:

- ``loop``: put versions 1, 2, ... of every user, round robin, until killed (prints ``started`` first).
- ``hang``: put version 1 of user 0 but stop before the rename (the temporary file is complete and
  fsync-ed; prints ``ready`` and sleeps until killed).
- ``half``: put version 1 of user 0 but stop half-way through writing the temporary file (``ready``).
"""

import os
import sys
import time

import torch

import vera_kernels as vk
from vera_kernels import store as store_mod


def value(user: int, version: int) -> float:
    return user * 1000.0 + version


def vectors(store, user: int, version: int):
    v = value(user, version)
    return {name: (torch.full((store.projection.rank,), v), torch.full((m["out_features"],), v))
            for name, m in store.modules.items()}


def main():
    directory, mode, users = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = vk.AdapterStore(directory)
    if mode == "loop":
        print("started", flush=True)
        version = 1
        while True:
            for u in range(users):
                store.put(f"user{u}", vectors(store, u, version))
            version += 1
    if mode == "hang":
        def stop(*args):
            print("ready", flush=True)
            time.sleep(600)
        store_mod.os.replace = stop
    elif mode == "half":
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                os.fsync(self.f.fileno())
                print("ready", flush=True)
                time.sleep(600)

        store_mod.os.fdopen = lambda fd, mode: Half(real_fdopen(fd, mode))
    store.put("user0", vectors(store, 0, 1))


if __name__ == "__main__":
    main()
