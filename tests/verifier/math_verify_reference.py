"""Math-Verify on the verifier table: agreement with our labels, disagreements with the
datagen verifier, and its speed (for `datagen bench verify --reference`).

    .venv/bin/pip install math-verify
    .venv/bin/python tests/verifier/math_verify_reference.py --cases tests/verifier/cases.jsonl \
        [--ours verdicts.jsonl] [--report tests/verifier/DISAGREEMENTS.md]

`--ours` is `datagen verify --input tests/verifier/cases.jsonl --explain` output. Without
`--ours`/`--report` it only prints {"pairs_per_s": ...}.
"""

import argparse
import json
import time

from math_verify import parse, verify


def delimited(answer):
    """Math-Verify's LaTeX extraction needs math delimiters; bare answers get `$…$`."""
    if any(d in answer for d in ("$", "\\boxed", "\\(", "\\[", "\n")) or len(answer) > 200:
        return answer
    return f"${answer}$"


def math_verify(gold, pred):
    try:
        return bool(verify(parse(delimited(gold)), parse(delimited(pred))))
    except Exception:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--ours")
    parser.add_argument("--report")
    args = parser.parse_args()
    cases = [json.loads(l) for l in open(args.cases) if l.strip()]
    start = time.perf_counter()
    verdicts = [math_verify(c["gold"], c["pred"]) for c in cases]
    rate = len(cases) / (time.perf_counter() - start)
    if args.ours and args.report:
        ours = [json.loads(l) for l in open(args.ours) if l.strip()]
        agree_labels = sum(v == c["expected"] for v, c in zip(verdicts, cases))
        ours_labels = sum(o["correct"] == c["expected"] for o, c in zip(ours, cases))
        with open(args.report, "w") as f:
            f.write("# Where the datagen verifier and Math-Verify disagree\n\n")
            f.write("Made by `tests/verifier/math_verify_reference.py` on `tests/verifier/cases.jsonl`.\n\n")
            f.write(f"- cases: {len(cases)}\n- datagen verifier agrees with the labels on {ours_labels} "
                    f"({100 * ours_labels / len(cases):.2f}%)\n- Math-Verify agrees with the labels on {agree_labels} "
                    f"({100 * agree_labels / len(cases):.2f}%)\n\n")
            f.write("| line | category | gold | prediction's answer | label | datagen | Math-Verify | why |\n|---|---|---|---|---|---|---|---|\n")
            for i, (c, o, m) in enumerate(zip(cases, ours, verdicts)):
                if o["correct"] != m:
                    cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")[:120]
                    f.write(f"| {i + 1} | {c['category']} | `{cell(c['gold'])}` | `{cell(o.get('extracted'))}` | "
                            f"{c['expected']} | {o['correct']} | {m} | REASON |\n")
    print(json.dumps({"pairs_per_s": rate, "agreement_with_labels": sum(v == c["expected"] for v, c in zip(verdicts, cases)) / len(cases)}))


if __name__ == "__main__":
    main()
