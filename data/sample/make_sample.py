"""Write data/sample/reddit_comments.zst and reddit_submissions.zst: made-up Reddit dump files.

    python data/sample/make_sample.py

They are shaped like the Pushshift / Arctic Shift archives: zstandard with a 2 GiB window (as
`zstd --long=31` writes them), one JSON object per line with fields data.load ignores, created_utc
sometimes a string, and a corrupt line each. Every text is generated here from templates (no real
Reddit text). Most comments are short r/AmItheAsshole verdicts ("YTA. You ...", "NTA, ...") so a small
model trained on them shows it learned something; the rest exercise each rule of data/extract.py: other
subreddits, AutoModerator, [deleted] authors, [deleted]/[removed] bodies, HTML entities as Reddit stores
them, U+FFFD, exact duplicates, and a December 2018 that the demo's --since 2019-01 leaves out.
Same bytes for the same --seed.
"""
import argparse
import calendar
import json
import random
from pathlib import Path

import zstandard

HERE = Path(__file__).parent
COMMENTS, SUBMISSIONS = HERE / "reddit_comments.zst", HERE / "reddit_submissions.zst"
MONTHS = {"2018_12": 600, "2019_01": 1800, "2019_02": 1800}  # comments per month
POSTS_PER_MONTH = 100

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


def month_start(month):
    year, number = map(int, month.split("_"))
    return calendar.timegm((year, number, 1, 0, 0, 0))


def comments_for(month, count, rng):
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
        created = month_start(month) + rng.randrange(28 * 86400)
        rows.append({"id": f"e{month.replace('_', '')}{i:05x}", "author": author, "subreddit": subreddit,
                     "body": body, "score": rng.randint(-5, 500), "controversiality": 0, "gilded": 0,
                     "created_utc": str(created) if rng.random() < 0.1 else created,  # both occur in the dumps
                     "link_id": f"t3_p{month.replace('_', '')}{rng.randrange(POSTS_PER_MONTH):03x}",
                     "parent_id": f"t3_p{month.replace('_', '')}{rng.randrange(POSTS_PER_MONTH):03x}"})
    return rows


def posts_for(month, rng):
    rows = []
    for i in range(POSTS_PER_MONTH):
        who = rng.choice(PEOPLE).removeprefix("your ")
        if rng.random() < 0.85:
            subreddit, title = "AmItheAsshole", f"{rng.choice(['AITA', 'WIBTA'])} for refusing to {rng.choice(ACTS)} for my {who}?"
            selftext = rng.choice([f"My {who} asked me to {rng.choice(ACTS)}. I said no.", "[removed]", "[deleted]", ""])
        else:
            subreddit = rng.choice(sorted(OTHER_SUBREDDITS))
            title, selftext = rng.choice(["What is your comfort food?", "Any advice for a first date?"]), ""
        rows.append({"id": f"p{month.replace('_', '')}{i:03x}", "author": f"op_{rng.randrange(5000)}",
                     "subreddit": subreddit, "title": title, "selftext": selftext, "score": rng.randint(0, 5000),
                     "num_comments": rng.randint(0, 900), "over_18": False, "is_self": True,
                     "created_utc": month_start(month) + rng.randrange(28 * 86400)})
    return rows


def write_dump(path, lines, frames=1):
    """lines (str, or bytes already ending in a newline) as a dump file: NDJSON in `frames` zstd frames
    written with window_log 31, as the archives are.

    Streamed frames do not record their size, so the decoder must reserve the whole 2 GiB window:
    zstd's default limit (2**27) refuses them, as it refuses the real archives without --long=31.
    Frames are cut at byte positions, so a frame may end inside a line or inside a UTF-8 character.
    """
    data = b"".join(line if isinstance(line, bytes) else line.encode("utf-8") + b"\n" for line in lines)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    cuts = [len(data) * i // frames for i in range(frames + 1)]
    with open(path, "wb") as f:
        for start, end in zip(cuts, cuts[1:]):
            with zstandard.ZstdCompressor(compression_params=params).stream_writer(f, closefd=False) as writer:
                writer.write(data[start:end])
    return Path(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2019)
    args = p.parse_args()
    rng = random.Random(args.seed)
    comments = [json.dumps(row, ensure_ascii=False) for month, count in MONTHS.items()
                for row in comments_for(month, count, rng)]
    posts = [json.dumps(row, ensure_ascii=False) for month in MONTHS for row in posts_for(month, rng)]
    comments.insert(len(comments) // 2, comments[10][:40])  # a line cut short, as a crashed crawler leaves
    posts.insert(len(posts) // 2, posts[10][:40])
    for path, lines in ((COMMENTS, comments), (SUBMISSIONS, posts)):
        write_dump(path, lines)
        print(f"wrote {path}: {len(lines)} lines, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
