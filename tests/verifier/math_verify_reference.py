"""Math-Verify on the verifier's labelled cases: its speed (for `datagen bench verify
--reference`), and the disagreement report tests/verifier/DISAGREEMENTS.md.

    .venv/bin/pip install math-verify==0.9.0

Speed (one JSON line {"pairs_per_s": ...}, timed after an untimed warm-up pass):

    .venv/bin/python tests/verifier/math_verify_reference.py --cases tests/verifier/model_written.jsonl \
        --pred-field response

Report, from `datagen verify --explain` output for each set (see DISAGREEMENTS.md for the whole
recipe). Reasons already written in the report are kept for the rows that still disagree; new rows
get REASON, to be written by hand:

    .venv/bin/python tests/verifier/math_verify_reference.py --report tests/verifier/DISAGREEMENTS.md \
        --set tests/verifier/cases.jsonl:pred:/tmp/table.jsonl \
        --set tests/verifier/model_written.jsonl:response:/tmp/written.jsonl \
        --set tests/verifier/outsider.jsonl:response:/tmp/outsider.jsonl
"""

import argparse
import collections
import json
import os
import re
import time

from math_verify import parse, verify


HEADER = """# Where the datagen verifier and Math-Verify disagree

Made by `tests/verifier/math_verify_reference.py` with math-verify 0.9.0 on the verifier's three
labelled sets (the table, the model-written answers of issue #11, and the outsider's set written by
an independent tester who read neither the verifier nor its cases), then each row's reason written by hand (the script keeps the reasons of rows that
still disagree). Every pair on which the two verifiers differ is listed, with its label. In the
table (`cases.jsonl`) bare answers are wrapped in `$…$`, as Math-Verify's LaTeX extraction needs;
in `model_written.jsonl` and `outsider.jsonl` Math-Verify is given the whole response, as graders
give it. The
`datagen` column is the verdict class (`correct`, `wrong`, `no_answer`, `unparsable`); a label or
verdict other than `correct`/True counts as not correct.

To remake it:

```sh
.venv/bin/pip install math-verify==0.9.0
D=target/release/datagen   # cargo build --release -p datagen
$D verify --input tests/verifier/cases.jsonl --explain > /tmp/table.jsonl
$D verify --input tests/verifier/model_written.jsonl --pred-field response --explain > /tmp/written.jsonl
$D verify --input tests/verifier/outsider.jsonl --pred-field response --explain > /tmp/outsider.jsonl
.venv/bin/python tests/verifier/math_verify_reference.py --report tests/verifier/DISAGREEMENTS.md \\
    --set tests/verifier/cases.jsonl:pred:/tmp/table.jsonl \\
    --set tests/verifier/model_written.jsonl:response:/tmp/written.jsonl \\
    --set tests/verifier/outsider.jsonl:response:/tmp/outsider.jsonl   # then fill in each REASON
```

"""


def delimited(answer):
    """Math-Verify's LaTeX extraction needs math delimiters; bare answers get `$…$`."""
    if any(d in answer for d in ("$", "\\boxed", "\\(", "\\[", "\n")) or len(answer) > 200:
        return answer
    return f"${answer}$"


def math_verify(gold, pred, whole_response):
    """Math-Verify's verdict. A whole response is given as it is, as graders give it; a bare
    answer (the table's `pred`) is wrapped in `$…$` like the gold answer."""
    try:
        parsed = parse(pred if whole_response else delimited(pred))
        return bool(parsed) and bool(verify(parse(delimited(gold)), parsed))
    except Exception:
        return False


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def verdicts(cases, field):
    return [math_verify(c["gold"], c[field], field != "pred") for c in cases]


def label_is_correct(case):
    return case["expected"] in (True, "correct")


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")[:120]


def existing_reasons(report):
    """Hand-written reasons of the current report, by (set, gold, answer)."""
    # The report before issue #11 had one unnamed section, the table's.
    reasons, section = {}, "cases.jsonl"
    if not os.path.exists(report):
        return reasons
    for line in open(report):
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 8 and cells[0].isdigit() and cells[7] != "REASON":
            reasons[(section, cells[2], cells[3])] = cells[7]
    return reasons


def section(path, field, ours_path, reasons, out):
    cases, ours = load(path), load(ours_path)
    assert len(cases) == len(ours), f"{ours_path} has {len(ours)} rows, {path} has {len(cases)}"
    theirs = verdicts(cases, field)
    name = os.path.basename(path)
    ours_ok = sum(o["correct"] == label_is_correct(c) for c, o in zip(cases, ours))
    theirs_ok = sum(m == label_is_correct(c) for c, m in zip(cases, theirs))
    false_ours = sum(o["correct"] and not label_is_correct(c) for c, o in zip(cases, ours))
    false_theirs = sum(m and not label_is_correct(c) for c, m in zip(cases, theirs))
    out.write(f"## {name}\n\n")
    out.write(f"- cases: {len(cases)} (`{field}` is the prediction)\n")
    out.write(f"- datagen verifier agrees with the labels on {ours_ok} ({100 * ours_ok / len(cases):.2f}%), "
              f"{false_ours} wrong answers judged correct\n")
    out.write(f"- Math-Verify agrees with the labels on {theirs_ok} ({100 * theirs_ok / len(cases):.2f}%), "
              f"{false_theirs} wrong answers judged correct\n\n")
    by = collections.defaultdict(lambda: [0, 0, 0])
    for c, o, m in zip(cases, ours, theirs):
        row = by[c["category"]]
        row[0] += 1
        row[1] += o["correct"] == label_is_correct(c)
        row[2] += m == label_is_correct(c)
    out.write("| category | cases | datagen | Math-Verify |\n|---|---|---|---|\n")
    for category, (n, a, b) in sorted(by.items()):
        out.write(f"| {category} | {n} | {a} | {b} |\n")
    out.write("\n| line | category | gold | prediction's answer | label | datagen | Math-Verify | why |\n"
              "|---|---|---|---|---|---|---|---|\n")
    for i, (c, o, m) in enumerate(zip(cases, ours, theirs)):
        if o["correct"] != m:
            gold, answer = f"`{cell(c['gold'])}`", f"`{cell(o.get('extracted'))}`"
            reason = reasons.get((name, gold, answer), "REASON")
            verdict = o.get("verdict", o["correct"])
            out.write(f"| {i + 1} | {c['category']} | {gold} | {answer} | {c['expected']} | {verdict} | {m} | {reason} |\n")
    out.write("\n")
    return by, theirs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", help="time Math-Verify on these rows")
    parser.add_argument("--pred-field", default="pred")
    parser.add_argument("--report", help="write the disagreement report here")
    parser.add_argument("--set", action="append", default=[], help="CASES:FIELD:OURS for the report")
    args = parser.parse_args()
    if args.report:
        reasons = existing_reasons(args.report)
        with open(args.report + ".new", "w") as out:
            out.write(HEADER)
            for spec in args.set:
                path, field, ours = spec.split(":")
                section(path, field, ours, reasons, out)
        os.replace(args.report + ".new", args.report)
    if args.cases:
        cases = load(args.cases)
        verdicts(cases, args.pred_field)  # warm-up: imports, caches, sympy's first calls
        start = time.perf_counter()
        found = verdicts(cases, args.pred_field)
        rate = len(cases) / (time.perf_counter() - start)
        agreement = sum(v == label_is_correct(c) for v, c in zip(found, cases)) / len(cases)
        print(json.dumps({"pairs_per_s": rate, "agreement_with_labels": agreement}))


if __name__ == "__main__":
    main()
