"""Topics 2 (runtime), 3, 4 (2 processes), 5: two CPU processes (gloo) via accelerate.debug_launcher.
Each rank writes its records to /tmp/oracle_data_2p/rank{r}.json; the parent prints them merged.
Usage: python oracle_data_3_two_process.py > output.txt"""
import json, os, sys, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
OUT = "/tmp/oracle_data_2p"


def worker():
    import torch
    from torch.utils.data import DataLoader
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from oracle_data_common import Stream, SizedStream, real_class, safe_len

    acc = Accelerator(cpu=True)
    r = acc.process_index
    gs = acc.gradient_state
    recs = []

    def cfg(split=False, dispatch=None, even=True, seedable=False, data_seed=None):
        c = acc.dataloader_config
        c.split_batches, c.dispatch_batches, c.even_batches = split, dispatch, even
        c.use_seedable_sampler, c.data_seed = seedable, data_seed

    def epoch(dl, gather=True):
        steps = []
        for b in dl:
            e, rem = gs.end_of_dataloader, gs.remainder
            g = acc.gather_for_metrics(b).tolist() if gather else None
            steps.append({"b": b.tolist(), "E": e, "rem": rem, "gfm": g})
        return steps

    # ---------------- Topic 4: seeds (default seed first, before anything seeds torch) ----------------
    recs.append({"topic": 4, "what": "torch.random.initial_seed() before any set_seed", "val": torch.random.initial_seed()})
    for n in (10, 7):
        cfg(seedable=True)
        p = acc.prepare(DataLoader(list(range(n)), batch_size=2, shuffle=True))
        smp = p.batch_sampler.batch_sampler.sampler
        recs.append({"topic": 4, "what": f"seedable, no set_seed, n={n}", "initial_seed": smp.initial_seed,
                     "sampler": type(smp).__name__,
                     "epochs": [[s["b"] for s in epoch(p, gather=False)] for _ in range(3)]})
    for n in (10, 7):
        set_seed(42)
        cfg(seedable=True)
        p = acc.prepare(DataLoader(list(range(n)), batch_size=2, shuffle=True))
        auto = [[s["b"] for s in epoch(p, gather=False)] for _ in range(3)]
        expl = []
        for e in range(3):
            p.set_epoch(e)
            expl.append([s["b"] for s in epoch(p, gather=False)])
        # interrupted epoch: break after one batch, then iterate again
        p.set_epoch(0)
        for b in p:
            first = b.tolist(); break
        after_break = [s["b"] for s in epoch(p, gather=False)]
        recs.append({"topic": 4, "what": f"seedable, set_seed(42) before prepare, n={n}",
                     "initial_seed": p.batch_sampler.batch_sampler.sampler.initial_seed,
                     "auto_epochs": auto, "set_epoch_0_1_2": expl,
                     "break_after_first": first, "next_iter_after_break": after_break,
                     "iteration_attr": p.iteration})
    # data_seed
    set_seed(42)
    cfg(seedable=True, data_seed=123)
    p = acc.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True))
    recs.append({"topic": 4, "what": "seedable, set_seed(42), data_seed=123, n=10",
                 "initial_seed": p.batch_sampler.batch_sampler.sampler.initial_seed,
                 "epochs": [[s["b"] for s in epoch(p, gather=False)] for _ in range(2)]})
    # resume in epoch 1 with skip_first_batches on a seedable loader
    set_seed(42)
    cfg(seedable=True)
    p = acc.prepare(DataLoader(list(range(10)), batch_size=2, shuffle=True))
    e0 = [s["b"] for s in epoch(p, gather=False)]
    sk = acc.skip_first_batches(p, 1)
    recs.append({"topic": 4, "what": "seedable 42, n=10: epoch0 on p, then skip_first_batches(p,1) iterated (p.iteration=1)",
                 "epoch0": e0, "skipped": [s["b"] for s in epoch(sk, gather=False)]})
    # non-seedable (default)
    for n in (10, 7):
        set_seed(42)
        cfg(seedable=False)
        p = acc.prepare(DataLoader(list(range(n)), batch_size=2, shuffle=True))
        g = p.synchronized_generator
        recs.append({"topic": 4, "what": f"NOT seedable (default), set_seed(42) before prepare, n={n}",
                     "sampler": type(p.batch_sampler.batch_sampler.sampler).__name__,
                     "rng_types": p.rng_types, "gen_initial_seed": g.initial_seed(),
                     "epochs": [[s["b"] for s in epoch(p, gather=False)] for _ in range(3)]})

    # ---------------- Topic 3 / 5: skip_first_batches on map-style ----------------
    for n in (10, 11):
        for split in (False, True):
            for dispatch in (False, True):
                for drop in (False, True):
                    cfg(split=split, dispatch=dispatch)
                    p = acc.prepare(DataLoader(list(range(n)), batch_size=2, drop_last=drop))
                    rec = {"topic": 3, "kind": "map", "n": n, "bs": 2, "split": split, "dispatch": dispatch,
                           "drop_last": drop, "class": real_class(p), "len": len(p), "runs": {}}
                    rec["runs"]["prepared"] = epoch(p)
                    for k in (0, 1, 2):
                        sk = acc.skip_first_batches(p, k)
                        rec["runs"][f"skip{k}"] = {"class": real_class(sk), "len": safe_len(sk),
                                                   "bsampler": type(sk.batch_sampler).__name__,
                                                   "steps": epoch(sk)}
                    recs.append(rec)
    # even_batches=False (shard only, no gather since ranks may differ)
    for n in (10, 11):
        cfg(even=False)
        p = acc.prepare(DataLoader(list(range(n)), batch_size=2))
        rec = {"topic": 3, "kind": "map even_batches=False", "n": n, "bs": 2, "split": False, "dispatch": False,
               "drop_last": False, "class": real_class(p), "len": len(p), "runs": {"prepared": epoch(p, gather=False)}}
        for k in (1, 2):
            sk = acc.skip_first_batches(p, k)
            rec["runs"][f"skip{k}"] = {"class": real_class(sk), "len": safe_len(sk), "steps": epoch(sk, gather=False)}
        recs.append(rec)

    # ---------------- Topic 3: iterable datasets ----------------
    for n in (10, 11):
        for sized in (False, True):
            for split in (False, True):
                for dispatch in (False, True):
                    cfg(split=split, dispatch=dispatch)
                    ds = SizedStream(n) if sized else Stream(n)
                    p = acc.prepare(DataLoader(ds, batch_size=2))
                    rec = {"topic": 3, "kind": "iterable" + (" sized" if sized else ""), "n": n, "bs": 2,
                           "split": split, "dispatch": dispatch, "drop_last": False, "class": real_class(p),
                           "dataset": type(p.dataset).__name__, "len": safe_len(p), "runs": {}}
                    rec["runs"]["prepared"] = epoch(p)
                    for k in (1, 2):
                        try:
                            sk = acc.skip_first_batches(p, k)
                            rec["runs"][f"skip{k}"] = {"class": real_class(sk), "len": safe_len(sk),
                                                       "skip_batches_attr": getattr(sk, "skip_batches", None),
                                                       "steps": epoch(sk)}
                        except Exception as e:
                            rec["runs"][f"skip{k}"] = {"error": f"{type(e).__name__}: {e}"}
                    recs.append(rec)

    # ---------------- Topic 2 runtime ----------------
    cfg(split=True, dispatch=True)
    try:
        acc.prepare(DataLoader(list(range(10)), batch_size=3))
        recs.append({"topic": 2, "what": "Accelerator.prepare split+dispatch bs=3 P=2", "val": "no error"})
    except Exception as e:
        recs.append({"topic": 2, "what": "Accelerator.prepare split+dispatch bs=3 P=2", "val": f"{type(e).__name__}: {e}"})
    for n in (4, 5):
        cfg(split=True, dispatch=True)
        p = acc.prepare(DataLoader(list(range(n)), batch_size=1))
        recs.append({"topic": 2, "what": f"split+dispatch bs=1 P=2 n={n}", "len": len(p), "steps": epoch(p, gather=False)})
    # non-concatenable batches with dispatch (split=False): rank 0 alone iterates (error is raised before any collective)
    def pad_collate(items):
        m = max(len(x) for x in items)
        return torch.stack([torch.nn.functional.pad(x, (0, m - len(x))) for x in items])
    cfg(split=False, dispatch=True)
    p = acc.prepare(DataLoader([torch.ones(i + 1) for i in range(6)], batch_size=2, collate_fn=pad_collate))
    if r == 0:
        try:
            next(iter(p))
            recs.append({"topic": 2, "what": "dispatch, batches of shape [2,2] and [2,4]", "val": "no error"})
        except Exception as e:
            recs.append({"topic": 2, "what": "dispatch, batches of shape [2,2] and [2,4]",
                         "val": f"{type(e).__name__}: {e}", "cause": repr(e.__cause__)})
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/rank{r}.json", "w") as f:
        json.dump(recs, f)


if __name__ == "__main__":
    import shutil
    shutil.rmtree(OUT, ignore_errors=True)
    from accelerate import debug_launcher
    debug_launcher(worker, num_processes=2)
    r0 = json.load(open(f"{OUT}/rank0.json"))
    r1 = json.load(open(f"{OUT}/rank1.json"))
    json.dump({"rank0": r0, "rank1": r1}, open(f"{OUT}/merged.json", "w"), indent=1)
    print("wrote", f"{OUT}/merged.json")
