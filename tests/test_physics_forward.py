"""Forward model: Parseval, the sub-pixel translation theorem, position convention, noise and detector helpers."""

from __future__ import annotations

import numpy as np
import pytest

from edgeptycho.physics import forward, probes
from edgeptycho.physics.fourier import far_field, fourier_shift


def _random_object(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.0, shape) * np.exp(1j * rng.uniform(-1, 1, shape))).astype(np.complex64)


def test_parseval_exit_wave_energy_equals_pattern_sum():
    n = 32
    obj = _random_object((80, 80))
    probe = probes.incoherent_modes(probes.gaussian_probe(n, 8.0), 3, blur_px=1.5)
    pos = np.array([[30.0, 30.0], [40.25, 35.5], [50.7, 44.1]])
    inten = forward.diffraction_intensity(obj, probe, pos, batch_size=2)
    starts = np.floor(pos).astype(int) - n // 2
    for j, ((r, c), f) in enumerate(zip(starts, pos - np.floor(pos), strict=True)):
        patch = obj[r : r + n, c : c + n]
        exits = fourier_shift(probe.astype(np.complex128), f) * patch
        # Parseval: Σ|P·O|² = ΣI, and the batched fast path equals |far_field|² summed over the modes
        assert inten[j].sum() == pytest.approx(np.sum(np.abs(exits) ** 2), rel=1e-5)
        np.testing.assert_allclose(inten[j], np.sum(np.abs(far_field(exits)) ** 2, axis=0), rtol=1e-4,
                                   atol=1e-6 * inten[j].max())


def test_shift_then_unshift_is_identity_and_half_pixel_gaussian_is_analytic():
    n, sigma = 64, 3.0
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))  # complex: the Nyquist term survives a shift
    np.testing.assert_allclose(fourier_shift(fourier_shift(x, (0.37, -1.61)), (-0.37, 1.61)), x, atol=1e-10)
    y = np.arange(n)[:, None]
    xx = np.arange(n)[None, :]
    g = np.exp(-((y - 32) ** 2 + (xx - 32) ** 2) / (2 * sigma**2))
    moved = fourier_shift(g, (0.5, -0.5))
    expected = np.exp(-((y - 32.5) ** 2 + (xx - 31.5) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(moved, expected, atol=1e-8)


def test_extract_patches_centres_window_on_subpixel_position():
    # object = smooth Gaussian bump at (40.3, 47.8); a window centred there must have the peak at n//2
    h, w, n = 96, 96, 32
    y, x = np.mgrid[0:h, 0:w]
    obj = np.exp(-((y - 40.3) ** 2 + (x - 47.8) ** 2) / (2 * 4.0**2)).astype(np.complex64)
    patch = forward.extract_patches(obj, np.array([[40.3, 47.8]]), n)[0]
    iy, ix = np.mgrid[0:n, 0:n]
    expected = np.exp(-((iy - n // 2) ** 2 + (ix - n // 2) ** 2) / (2 * 4.0**2))
    np.testing.assert_allclose(patch.real, expected, atol=2e-4)
    integer = forward.extract_patches(obj, np.array([[40.0, 47.0]]), n)[0]
    np.testing.assert_array_equal(integer, obj[40 - 16 : 40 + 16, 47 - 16 : 47 + 16])


def test_window_outside_object_is_a_clear_error():
    with pytest.raises(ValueError, match="outside"):
        forward.extract_patches(np.ones((40, 40), np.complex64), np.array([[5.0, 20.0]]), 16)


def test_probe_larger_than_frame_is_rejected():
    with pytest.raises(ValueError, match="larger than the detector frame"):
        forward.diffraction_intensity(np.ones((200, 200)), probes.gaussian_probe(128, 10), [[100.0, 100.0]],
                                      frame_size=64)


def test_poisson_counts_match_dose():
    rng = np.random.default_rng(0)
    inten = rng.exponential(1.0, (200, 32, 32)).astype(np.float32)
    dose = 5e4
    counts = forward.add_noise(inten, dose=dose, rng=1)
    assert counts.dtype == np.uint32
    sums = counts.sum(axis=(1, 2), dtype=np.float64)
    # the mean of 200 Poisson totals of mean `dose` has standard error √(dose/200)
    assert abs(sums.mean() - dose) < 5 * np.sqrt(dose / 200)
    ratio = inten.sum(axis=(1, 2)) / inten.sum(axis=(1, 2)).mean()  # pattern-to-pattern variation kept
    np.testing.assert_allclose(sums / dose, ratio, rtol=0.05)


def test_background_saturation_and_noise_free():
    inten = np.full((50, 16, 16), 1.0, np.float32)
    counts = forward.add_noise(inten, dose=256 * 10.0, background=2.0, rng=0)
    assert counts.mean() == pytest.approx(12.0, rel=0.02)
    clipped = forward.add_noise(inten, dose=256 * 10.0, saturation=11, rng=0)
    assert clipped.max() == 11
    free = forward.add_noise(inten, None, background=0.5, saturation=1.2)
    assert free.dtype == np.float32 and np.allclose(free, 1.2)


@pytest.mark.parametrize("kw, word", [({"dose": -1.0}, "dose"), ({"dose": 0.0}, "dose"),
                                      ({"dose": 10.0, "background": -1.0}, "background"),
                                      ({"dose": 10.0, "saturation": 0}, "saturation")])
def test_bad_noise_parameters_name_the_problem(kw, word):
    with pytest.raises(ValueError, match=word):
        forward.add_noise(np.ones((2, 8, 8)), **kw)


def test_same_rng_seed_same_counts():
    inten = np.random.default_rng(2).exponential(1.0, (5, 16, 16))
    np.testing.assert_array_equal(forward.add_noise(inten, 1e4, rng=7), forward.add_noise(inten, 1e4, rng=7))


def test_crop_center_keeps_zero_frequency_and_bin_conserves_counts():
    frames = np.zeros((3, 64, 64), np.uint32)
    frames[:, 32, 32] = 100
    cropped = forward.crop_center(frames, 16)
    assert cropped.shape == (3, 16, 16) and cropped[0, 8, 8] == 100
    frames = np.random.default_rng(0).integers(0, 1000, (3, 64, 64)).astype(np.uint32)
    binned = forward.bin_frames(frames, 4)
    assert binned.shape == (3, 16, 16) and binned.dtype == np.uint32
    np.testing.assert_array_equal(binned.sum(axis=(1, 2)), frames.sum(axis=(1, 2)))
    for b in (2, 4):  # the strided float path (model input, residual) sums exactly what the integer path does
        for dtype in (np.uint16, np.uint32, np.float32):
            f = frames.astype(dtype)
            np.testing.assert_array_equal(forward.bin_frames(f, b, dtype=np.float32),
                                          forward.bin_frames(frames, b).astype(np.float32))
    with pytest.raises(ValueError, match="bin factor"):
        forward.bin_frames(frames, 3)
    with pytest.raises(ValueError, match="crop size"):
        forward.crop_center(frames, 65)


def test_bin_frames_writes_into_out_and_reused_buffers_never_leak_between_calls():
    rng = np.random.default_rng(3)
    a = rng.poisson(40, (4, 16, 16)).astype(np.uint32)
    b = rng.poisson(40, (2, 24, 24)).astype(np.uint16)
    ref_a = a.reshape(4, 8, 2, 8, 2).sum(axis=(2, 4)).astype(np.float32)
    first = forward.bin_frames(a, 2, dtype=np.float32)
    out = np.full((2, 8, 8), np.nan, np.float32)
    got = forward.bin_frames(b, 3, dtype=np.float32, out=out)  # other shapes reuse the same thread buffers
    assert got is out
    np.testing.assert_array_equal(out, b.reshape(2, 8, 3, 8, 3).sum(axis=(2, 4)).astype(np.float32))
    np.testing.assert_array_equal(first, ref_a)  # the earlier result is the caller's own array
    with pytest.raises(ValueError, match="out must be"):
        forward.bin_frames(a, 2, dtype=np.float32, out=np.empty((4, 8, 7), np.float32))
