"""Fails unless every Autobahn case passed with an OK (or INFORMATIONAL)
verdict for both its behaviour and its closing behaviour, and 6.4.x (fail
fast on invalid UTF-8) is strictly OK."""
import json
import sys

report = json.load(open(sys.argv[1]))
bad = []
total = 0
for agent, cases in report.items():
    for case, r in cases.items():
        total += 1
        for key in ("behavior", "behaviorClose"):
            if r[key] not in ("OK", "INFORMATIONAL"):
                bad.append(f"{case} {key}={r[key]}")
        if case.startswith("6.4.") and r["behavior"] != "OK":
            bad.append(f"{case} not fail-fast: {r['behavior']}")
print(f"autobahn strict: {total} cases, {len(bad)} not OK")
for b in bad:
    print("  " + b)
sys.exit(1 if bad or total == 0 else 0)
