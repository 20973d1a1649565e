"""Page pool: exact ids, free-list order and counts (S4.1, S4.2)."""

import random

import pytest

from loramux.core.page_pool import PagePool


def test_S4_1_fixed_size_pages_exact_ids_and_free_order():
    pool = PagePool(num_pages=4, page_size=16)
    assert pool.pages_for(1) == 1 and pool.pages_for(16) == 1 and pool.pages_for(17) == 2
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) is None  # "cannot allocate now" is a value, and nothing changed
    assert pool.num_free == 2
    pool.decref([0])
    assert pool.allocate(3) == [0, 2, 3]  # the page freed last is handed out first (memory follows use)
    assert pool.num_free == 0
    pool.check_integrity({0: 1, 1: 1, 2: 1, 3: 1})


def test_S4_1_shared_pages_return_only_when_the_last_holder_lets_go():
    pool = PagePool(num_pages=2, page_size=4)
    (p,) = pool.allocate(1)
    pool.incref([p])
    pool.decref([p])
    assert pool.num_free == 1 and pool.refcount(p) == 1
    pool.decref([p])
    assert pool.num_free == 2 and pool.refcount(p) == 0


def test_S4_2_double_free_is_caught():
    pool = PagePool(num_pages=2, page_size=4)
    pages = pool.allocate(1)
    pool.decref(pages)
    with pytest.raises(AssertionError, match="double free"):
        pool.decref(pages)


def test_S4_2_a_page_is_never_handed_out_twice_under_random_use():
    rng = random.Random(0)
    pool = PagePool(num_pages=32, page_size=4)
    held: list[int] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            pool.decref([held.pop(rng.randrange(len(held)))])
        else:
            got = pool.allocate(rng.randint(1, 4))
            if got is None:
                assert pool.num_free < 4
                continue
            assert not set(got) & set(held), "a page was handed out twice"
            held += got
        pool.check_integrity({p: 1 for p in held})


def test_bad_sizes_are_refused_with_the_value():
    with pytest.raises(ValueError, match="num_pages=0"):
        PagePool(0, 16)
    with pytest.raises(ValueError, match="page_size=0"):
        PagePool(4, 0)
