"""The model registry on a local folder and on S3 (moto on loopback, real conditional writes): one lock holder at
a time, stale locks taken over, and a champion pointer that only one of two racing promotions can replace."""

import threading
import time

import pytest

from dermray import storage
from dermray.errors import DermrayError
from dermray.ops.registry import Registry


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
    return Registry(f"s3://{request.getfixturevalue('bucket')}/registry")


def test_lock_is_exclusive_until_released(registry):
    lock = registry.acquire("run-a", ttl_seconds=600)
    with pytest.raises(DermrayError, match="locked by run run-a"):
        registry.acquire("run-b", ttl_seconds=600)
    registry.release(lock)
    registry.release(registry.acquire("run-b", ttl_seconds=600))


def test_an_expired_lock_is_taken_over(registry):
    registry.acquire("killed-run", ttl_seconds=0.5)
    time.sleep(1.0)
    lock = registry.acquire("next-run", ttl_seconds=600)
    assert lock.owner == "next-run"
    with pytest.raises(DermrayError, match="locked by run next-run"):
        registry.acquire("third-run", ttl_seconds=600)


def test_release_does_not_remove_someone_elses_lock(registry):
    stale = registry.acquire("slow-run", ttl_seconds=0.5)
    time.sleep(1.0)
    registry.acquire("fresh-run", ttl_seconds=600)
    registry.release(stale)  # the slow run finishing late must not free the fresh run's lock
    with pytest.raises(DermrayError, match="locked by run fresh-run"):
        registry.acquire("third-run", ttl_seconds=600)


def test_only_one_of_two_racing_promotions_wins(registry):
    assert registry.champion() is None
    assert registry.promote({"checkpoint": "first"}, replacing=None)
    base = registry.champion()
    results: dict[str, bool] = {}
    barrier = threading.Barrier(2)

    def promote(name: str) -> None:
        barrier.wait()
        results[name] = registry.promote({"checkpoint": name}, replacing=base)

    threads = [threading.Thread(target=promote, args=(n,)) for n in ("challenger-a", "challenger-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [False, True]
    winner = next(name for name, won in results.items() if won)
    assert registry.champion().record["checkpoint"] == winner
    assert not registry.promote({"checkpoint": "late"}, replacing=base)  # based on a champion that is gone


def test_history_and_data_state_round_trip(registry):
    registry.record({"run": "r1", "promoted": True})
    registry.record({"run": "r2", "promoted": False})
    assert [h["run"] for h in registry.history()] == ["r1", "r2"]
    assert registry.data_state() is None
    registry.set_data_state({"images": 3})
    assert registry.data_state() == {"images": 3}
    assert storage.exists(storage.join(registry.root, "data_state.json"))
