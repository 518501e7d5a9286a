"""The fuzz targets run without atheris: on their seed corpus, on random inputs, on known bugs.

``python -m fuzz all`` runs the same functions under coverage-guided fuzzing; this module
keeps the harness working in CI and pins every failure the fuzzer found as a regression
test.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p.recordpolicy import RecordValidator
from fuzz import targets
from fuzz.make_corpus import seed_inputs, write_corpus
from fuzz.runner import CORPUS_DIR, REPO_ROOT, crash_signature, keep_going
from fuzz.structure import ByteSource, samples

RANDOM_INPUTS = 300
RANDOM_SEED = 20_240_601


@pytest.fixture(autouse=True, scope="module")
def _close_dht_harness() -> Iterator[None]:
    yield
    targets.close_dht_harness()


def _random_inputs(name: str, count: int) -> list[bytes]:
    """Random bytes, structured-mode inputs and mutated seeds, the same on every run."""
    rng = random.Random(f"{RANDOM_SEED}-{name}")
    seeds = list(seed_inputs()[name].values())
    inputs = []
    for i in range(count):
        size = rng.choice((0, 1, 2, 11, 12, 13, 40, 150, 600, 2000))
        data = bytearray(rng.randbytes(size))
        if i % 3 == 1 and data:
            data[0] |= targets.STRUCTURED
        elif i % 3 == 2:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        inputs.append(bytes(data))
    return inputs


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_passes_its_seed_corpus(name: str) -> None:
    """Every checked-in seed runs through its target without a failure."""
    paths = sorted((CORPUS_DIR / name).glob("*.bin"))
    assert len(paths) >= 3
    for path in paths:
        targets.TARGETS[name].function(path.read_bytes())


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_passes_random_inputs(name: str) -> None:
    """300 random and mutated inputs (fixed seed) run through each target without a failure."""
    function = targets.TARGETS[name].function
    for data in _random_inputs(name, RANDOM_INPUTS):
        function(data)


def test_seed_corpus_is_current(tmp_path: Path) -> None:
    """fuzz/corpus/ is what ``python -m fuzz.make_corpus`` writes today."""
    write_corpus(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.bin")}
    stored = {p.relative_to(CORPUS_DIR): p.read_bytes() for p in CORPUS_DIR.rglob("*.bin")}
    assert fresh == stored


def test_targets_do_not_import_atheris() -> None:
    """The targets load without atheris, and the runner leaves difs_p2p to the fuzzer."""
    code = (
        "import sys, fuzz.runner; "
        "assert 'difs_p2p' not in sys.modules, 'the runner imports difs_p2p too early'; "
        "import fuzz.targets, fuzz.make_corpus; "
        "assert 'atheris' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_runner_lists_targets_without_fuzzing() -> None:
    """``python -m fuzz list`` names every target and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "list"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(targets.TARGETS)


def test_keep_going_saves_the_shortest_input_per_failure(tmp_path: Path) -> None:
    """A failing input is saved once per distinct failure, replaced only by a shorter one."""

    def target(data: bytes) -> None:
        if b"!" in data:
            raise ValueError("bang")

    run = keep_going("demo", target, tmp_path)
    for data in (b"ok", b"long input !", b"ab!", b"much longer input !"):
        run(data)
    saved = list(tmp_path.glob("*.bin"))
    assert [p.read_bytes() for p in saved] == [b"ab!"]
    report = saved[0].with_suffix(".txt").read_text()
    assert report.startswith("ValueError at tests/test_fuzz_targets.py:")
    assert b"ab!".hex() in report


def test_crash_signature_names_the_deepest_frame_in_our_code() -> None:
    """A failure inside difs_p2p is named by its type and the difs_p2p frame that raised."""
    from difs_p2p.segments import Layout

    try:
        Layout(-1, 1)
    except Exception as exc:
        assert crash_signature(exc).startswith("UsageError at difs_p2p/segments.py:")
    else:
        raise AssertionError("Layout(-1, 1) must raise")


def test_byte_source_gives_zeros_once_the_input_runs_out() -> None:
    """Choices read past the end of the input are 0, so any input gives some value."""
    src = ByteSource(b"\x05")
    assert src.below(3) == 2
    assert (src.below(3), src.uint(4), src.exact(3), src.rest()) == (0, 0, b"\0\0\0", b"")


def test_samples_are_valid_records() -> None:
    """The records that structured inputs mutate are accepted by the DHT's policy."""
    sample = samples()
    validator = RecordValidator()
    assert validator.record_rank(sample.manifest_key, sample.manifests[0], 0.0) == (1,)
    assert validator.entry_identity(sample.holder_key, sample.holder, 10.0) is not None


# -- failures found by the fuzzer -----------------------------------------------------------


def _manifest(created: bytes, sig: str) -> bytes:
    """The sample manifest (/a/b, version 1) with the given 'created' text and signature."""
    return (
        b'{"info":{"created":'
        + created
        + b',"deleted":false,"hash":"blake3","integrity":"'
        + b"0" * 64
        + b'","key":"97ac427c49391fb77bb306bdb09d772d73e38434","name":"/a/b","parent":null,'
        b'"replicas":3,"root":null,"segment_count":1,"segment_size":4096,"size":10,"stripes":1,'
        b'"version":1},"publisher":'
        b'"3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29","sig":"'
        + sig.encode()
        + b'","t":"difs-manifest","v":1}'
    )


# json.loads accepts NaN, Infinity and overflowing numbers such as 1e999; parse_manifest
# then reaches the signature check, where canonical_json(..., allow_nan=False) raises
# ValueError. No valid signature is needed (this one is the sample's, for created 0.0).
NAN_CREATED_MANIFEST = _manifest(
    b"NaN",
    "67d79253d4ab756cad2cadeea0cb1cedccfe698be0d67b330568d22f19becf13"
    "abc56521802edabcdee4ee3d3c90df343044dacf0c296cffa25a4f66fde59f0a",
)
# Validly signed (by the sample key) with a 400-digit 'created': every check passes, then
# float(created) raises OverflowError.
HUGE_CREATED_MANIFEST = _manifest(
    b"9" * 400,
    "c94ed4c9f01e6b6611dda4f971b6f91e77c0fa88708942af9ae91cb42906a0ab"
    "96cbb7c538e2a0a8321e3a6500f830bd599d29418cbe66058508aaf9df105000",
)
# A structured dht_datagram input: get() of the sample manifest's key, whose find_value
# request is answered {"value": NAN_CREATED_MANIFEST} (with sorted keys, as it is).
GET_ANSWERED_WITH_NAN_CREATED = bytes.fromhex(
    "80000100" + "11" * 20 + "00000101010000000d010103000100"
)


def test_manifest_with_nan_created_is_refused_with_wire_error() -> None:
    """A manifest whose 'created' is NaN is refused with WireError, not ValueError."""
    targets.manifest_record(NAN_CREATED_MANIFEST)


def test_manifest_with_overflowing_created_is_refused_with_wire_error() -> None:
    """A manifest whose 'created' overflows to infinity is refused with WireError."""
    targets.manifest_record(NAN_CREATED_MANIFEST.replace(b"NaN", b"1e999"))


def test_signed_manifest_with_huge_created_is_refused_with_wire_error() -> None:
    """A validly signed manifest whose 'created' does not fit a float is refused with WireError."""
    targets.manifest_record(HUGE_CREATED_MANIFEST)


def test_get_survives_a_find_value_reply_with_nan_created() -> None:
    """Dht.get skips a peer's unparseable record instead of failing."""
    harness = targets.DhtHarness()
    try:
        harness.run(GET_ANSWERED_WITH_NAN_CREATED)
    finally:
        harness.close()
