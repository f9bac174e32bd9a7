"""Long fuzz run of the HTTP/1.1 server codec: it must raise nothing but ``BadRequest``.

The test suite runs the same property with fixed examples; this runs it with fresh random ones,
many more of them. One command: ``python benchmarks/fuzz_codec.py [--examples 20000]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

import test_codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args()

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.lists(
            st.sampled_from(test_codec._TOKENS) | st.binary(min_size=1, max_size=8), max_size=24
        ),
        st.integers(min_value=1, max_value=64),
    )
    def request_like(tokens: list[bytes], size: int) -> None:
        data = b"".join(tokens)
        test_codec._exercise([data[i : i + size] for i in range(0, len(data), size)])

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
    def arbitrary(chunks: list[bytes]) -> None:
        test_codec._exercise(chunks)

    request_like()
    arbitrary()
    print(f"ok: {args.examples} request-like and {args.examples} arbitrary inputs")


if __name__ == "__main__":
    main()
