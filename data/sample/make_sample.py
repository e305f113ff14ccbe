"""Write data/sample/comments.jsonl.gz: made-up Reddit comments shaped like fh-bigquery.reddit_comments.

    python data/sample/make_sample.py

Every comment is generated here from templates (no real Reddit text). Most are short r/AmItheAsshole
verdicts ("YTA. You ...", "NTA, ...") so a small model trained on them shows it learned something;
the rest exercise each rule of data/extract.py: other subreddits, AutoModerator, [deleted] authors,
[deleted]/[removed] bodies, HTML entities as Reddit stores them, U+FFFD, exact duplicates, and a
2018_12 table that the demo's 2019_* wildcard does not read. Same output for the same --seed.
"""
import argparse
import calendar
import gzip
import io
import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("comments.jsonl.gz")
TABLES = {"2018_12": 600, "2019_01": 1800, "2019_02": 1800}

YTA_OPENERS = ["YTA.", "YTA", "Yta.", "yta,", "YTA, sorry.", "Gonna go with YTA.", "YTA here.", "Honestly? YTA."]
NTA_OPENERS = ["NTA.", "NTA", "Nta,", "NTA, clearly.", "Definitely NTA."]
OTHER_OPENERS = ["ESH.", "NAH.", "INFO: how old are you?", "INFO.", "ESH, honestly."]
PEOPLE = ["your sister", "your roommate", "your mom", "your boyfriend", "your girlfriend", "your coworker",
          "your best friend", "your brother", "your wife", "your husband", "your neighbor", "your dad"]
YTA_REASONS = [
    "You can't just {act} and expect {who} to be fine with it.",
    "You knew {who} cared about this and you did it anyway.",
    "{Who} asked you one simple thing and you {past}.",
    "Imagine how {who} felt when you {past} in front of everyone.",
    "You owe {who} an apology, a real one this time.",
    "It was not your call to {act}, and you know it.",
    "The fact that you had to ask says a lot.",
    "You made it all about yourself, again.",
]
NTA_REASONS = [
    "{Who} is way out of line here.",
    "You don't owe {who} anything.",
    "You set a boundary and {who} stomped on it.",
    "{Who} needs to apologize to you, not the other way around.",
]
ACTS = ["skip the wedding", "read their messages", "eat the leftovers", "sell the car", "cancel the trip",
        "invite your ex", "change the locks", "post the photos", "keep the money", "move out without telling anyone"]
PASTS = ["laughed at them", "ignored them", "ate their food", "told everyone", "walked out", "sold their stuff",
         "went anyway", "forgot their birthday", "made a scene", "took the last slice"]
CLOSERS = ["", "", " Do better.", " Just apologize.", " Wow.", " Come on.", " Edit: typo.",
           " This is not hard.", " Talk to them.", " Seriously."]
ENTITY_EXTRAS = [" Also, &quot;it&#39;s just a joke&quot; isn&#39;t an excuse.", " Money &amp; pride &gt; family? Really?",
                 " &lt;3 to your sister though.", " You&#x27;re the problem here.", " It&rsquo;s that simple&hellip;"]
OTHER_SUBREDDITS = {
    "relationship_advice": ["Talk to them before you decide anything.", "YTA energy, but it is not that sub.",
                            "Couples counseling helped us a lot.", "Give it time and be honest."],
    "AskReddit": ["Pizza, every time.", "My grandmother's soup.", "The ocean at night, honestly.",
                  "YTA is what my cat would say.", "Whatever is on sale."],
}
AUTOMOD = ("^^^^AUTOMOD ***Thanks for posting!*** This comment is a copy of your post so readers can "
           "see the original text. YTA or NTA? Vote below.")


def aita_comment(rng):
    kind = rng.random()
    who = rng.choice(PEOPLE)
    fill = dict(who=who, Who=who[0].upper() + who[1:], act=rng.choice(ACTS), past=rng.choice(PASTS))
    if kind < 0.6:
        text = f"{rng.choice(YTA_OPENERS)} {rng.choice(YTA_REASONS).format(**fill)}{rng.choice(CLOSERS)}"
    elif kind < 0.85:
        text = f"{rng.choice(NTA_OPENERS)} {rng.choice(NTA_REASONS).format(**fill)}{rng.choice(CLOSERS)}"
    else:
        text = f"{rng.choice(OTHER_OPENERS)} {rng.choice(YTA_REASONS).format(**fill)}"
    # Reddit's dumps store &, <, > (and some pasted text) as HTML entities
    text = text.replace("&", "&amp;")
    if rng.random() < 0.06:
        text += rng.choice(ENTITY_EXTRAS)
    if rng.random() < 0.01:
        text = text.replace(" ", " \ufffd", 1)  # a mangled character, as in the public dumps
    return text


def rows_for(table, count, rng):
    year, month = map(int, table.split("_"))
    month_start = calendar.timegm((year, month, 1, 0, 0, 0))
    rows = []
    for i in range(count):
        author, subreddit = f"user_{rng.randrange(5000)}", "AmItheAsshole"
        r = rng.random()
        if r < 0.03:
            body = rng.choice(["[deleted]", "[removed]"])
        elif r < 0.05:
            author, body = "AutoModerator", AUTOMOD
        elif r < 0.07:
            author, body = "[deleted]", aita_comment(rng)
        elif r < 0.15:
            subreddit = rng.choice(sorted(OTHER_SUBREDDITS))
            body = rng.choice(OTHER_SUBREDDITS[subreddit])
        elif r < 0.18 and rows:
            body = rng.choice(rows)["body"]  # an exact duplicate (copy-pasted verdicts are common)
        else:
            body = aita_comment(rng)
        rows.append({"table": table, "id": f"e{table.replace('_', '')}{i:05x}", "author": author,
                     "subreddit": subreddit, "body": body, "score": rng.randint(-5, 500),
                     "created_utc": month_start + rng.randrange(28 * 86400)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    rng = random.Random(args.seed)
    lines = [json.dumps(row, ensure_ascii=False) for table, count in TABLES.items()
             for row in rows_for(table, count, rng)]
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:  # mtime=0: same bytes every run
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    args.out.write_bytes(buffer.getvalue())
    print(f"wrote {args.out}: {len(lines)} rows, {len(buffer.getvalue()):,} bytes")


if __name__ == "__main__":
    main()
