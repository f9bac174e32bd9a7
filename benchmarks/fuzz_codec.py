"""Long fuzz runs of both HTTP/1.1 server codecs, and a differential fuzz between them.

1. Each codec, on its own, must raise nothing but ``BadRequest`` whatever the bytes.
2. The same input must give the h11 codec and the httptools codec the same trace (events, our
   response bytes, error status and local-reply bytes), except where llhttp is documented to be
   stricter (``tests/unit/test_codec_conformance.py``: STRICTER).

The test suite runs the same properties with fixed examples; this runs them with fresh random ones,
many more of them, and prints how many inputs each codec accepted, rejected, and how many
documented differences it saw. One command, bounded by --examples:
``python benchmarks/fuzz_codec.py [--examples 20000]``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

import test_codec
import test_codec_conformance as conformance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args()
    tally: collections.Counter[str] = collections.Counter()
    fuzz = settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    tokens = st.sampled_from(test_codec._TOKENS + conformance._TOKENS)
    request_like = st.lists(tokens, max_size=24)
    # Well-formed requests with a hostile header or two: most are accepted, so the comparison
    # reaches bodies, pipelining, cycles and our response framing, not only the first error.
    line = st.sampled_from(
        [
            b"GET / HTTP/1.1\r\n",
            b"POST /x?a=1 HTTP/1.1\r\n",
            b"HEAD / HTTP/1.1\r\n",
            b"PUT / HTTP/1.0\r\n",
        ]
    )
    header = st.sampled_from(
        [
            b"X-A: b\r\n",
            b"X-B:  c d \r\n",
            b"Connection: close\r\n",
            b"Connection: keep-alive\r\n",
            b"Expect: 100-continue\r\n",
            b"Content-Length: 0\r\n",
            b"Host: b\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Content-Length: 3, 3\r\n",
            b"Upgrade: websocket\r\n",
        ]
    )
    body = st.sampled_from(
        [
            (b"", b""),
            (b"Content-Length: 3\r\n", b"abc"),
            (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            (b"Transfer-Encoding: chunked\r\n", b"1;e=f\r\nz\r\n0\r\nX-T: 1\r\n\r\n"),
            (b"Content-Length: 5\r\n", b"ab"),
        ]
    )
    request = st.builds(
        lambda ln, hs, b, host: (
            ln + (b"Host: a\r\n" if host else b"") + b"".join(hs) + b[0] + b"\r\n" + b[1]
        ),
        line,
        st.lists(header, max_size=3),
        body,
        st.booleans() | st.just(True),
    )
    structured = st.lists(request, min_size=1, max_size=4)
    noisy = st.lists(tokens | st.binary(min_size=1, max_size=8), max_size=24)

    def compare(chunks: list[bytes]) -> None:
        for codecs in (conformance.H11, conformance.HTTPTOOLS):
            test_codec._exercise(codecs, chunks)  # raises anything but BadRequest
        expected = conformance.trace(conformance.H11, chunks)
        got = conformance.trace(conformance.HTTPTOOLS, chunks)
        if conformance._reply_fields(got) == conformance._reply_fields(expected):
            tally[
                "same, accepted" if expected and expected[0][0] == "head" else "same, rejected"
            ] += 1
            return
        label = conformance.known_difference(chunks, expected, got)
        assert label, (b"".join(chunks), expected, got)
        tally[f"documented difference: {label}"] += 1

    @fuzz
    @given(request_like, st.integers(min_value=1, max_value=64))
    def request_like_inputs(tokens: list[bytes], size: int) -> None:
        data = b"".join(tokens)
        compare([data[i : i + size] for i in range(0, len(data), size)])

    @fuzz
    @given(noisy, st.integers(min_value=1, max_value=64))
    def noisy_inputs(tokens: list[bytes], size: int) -> None:
        data = b"".join(tokens)
        compare([data[i : i + size] for i in range(0, len(data), size)])

    @fuzz
    @given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
    def arbitrary(chunks: list[bytes]) -> None:
        compare(chunks)

    @fuzz
    @given(structured, st.integers(min_value=1, max_value=200))
    def structured_inputs(requests: list[bytes], size: int) -> None:
        data = b"".join(requests)
        compare([data[i : i + size] for i in range(0, len(data), size)])

    structured_inputs()
    request_like_inputs()
    noisy_inputs()
    arbitrary()
    print(f"ok: {args.examples} each of structured, request-like, noisy, arbitrary inputs")
    for outcome, count in sorted(tally.items()):
        print(f"  {outcome}: {count}")


if __name__ == "__main__":
    main()
