"""Formats the 2-process records written by oracle_data_3_two_process.py (/tmp/oracle_data_2p/merged.json)
into markdown tables (topics 3 and 5). No new values are computed here."""
import json
m = json.load(open("/tmp/oracle_data_2p/merged.json"))
R0 = [x for x in m["rank0"] if x.get("topic") == 3]
R1 = [x for x in m["rank1"] if x.get("topic") == 3]


def steps_str(steps):
    return " ".join(f"{s['b']}{'E' if s['E'] else ''}" for s in steps)


def rem_str(steps):
    return ",".join(str(s["rem"]) for s in steps)


def gfm_str(steps):
    return " ".join(str(s["gfm"]) for s in steps) if steps and steps[0].get("gfm") is not None else "-"


print("Legend: each batch is followed by E when gradient_state.end_of_dataloader was True during that step;")
print("rem = gradient_state.remainder during each step; gfm = accelerator.gather_for_metrics(batch) (same on both ranks).")
for a, b in zip(R0, R1):
    assert (a["kind"], a["n"], a["split"], a["dispatch"], a["drop_last"]) == (b["kind"], b["n"], b["split"], b["dispatch"], b["drop_last"])
    head = (f"\n#### {a['kind']} n={a['n']} bs={a['bs']} split_batches={a['split']} dispatch_batches={a['dispatch']} "
            f"drop_last={a['drop_last']} -> {a['class']}" + (f" (dataset {a['dataset']})" if 'dataset' in a else "") +
            f", len r0/r1 = {a['len']}/{b['len']}")
    print(head)
    print("| loader | class | len r0/r1 | rank0 batches | rank1 batches | rem (r0) | gather_for_metrics |")
    print("|---|---|---|---|---|---|---|")
    for key in a["runs"]:
        ra, rb = a["runs"][key], b["runs"][key]
        if key == "prepared":
            print(f"| prepared | {a['class']} | {a['len']}/{b['len']} | {steps_str(ra)} | {steps_str(rb)} | {rem_str(ra)} | {gfm_str(ra)} |")
        elif "error" in ra:
            print(f"| {key} | {ra['error']} | | | | | |")
        else:
            print(f"| skip_first_batches(.., {key[4:]}) | {ra['class']} | {ra['len']}/{rb['len']} | {steps_str(ra['steps'])} | "
                  f"{steps_str(rb['steps'])} | {rem_str(ra['steps'])} | {gfm_str(ra['steps'])} |")
