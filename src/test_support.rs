//! Helpers shared by the unit tests of the image modules (fixtures written by
//! `export/fixtures_numerics.py` and `export/jpeg_matrix.py`).

use std::path::PathBuf;

use image::RgbImage;
use ndarray::Array3;
use ndarray_npy::read_npy;

/// A file under `tests/fixtures/numerics/`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/tests/fixtures/numerics/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
}

/// A `.npy` fixture under `tests/fixtures/numerics/`.
pub fn fixture<T: ndarray_npy::ReadableElement, D: ndarray::Dimension>(
    name: &str,
) -> ndarray::Array<T, D> {
    let p = path(name);
    read_npy(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// An image fixture decoded as the runtime decodes it.
pub fn load(name: &str) -> RgbImage {
    crate::image_decode::load_rgb(path(name)).unwrap()
}

/// (max |a − b|, number of differing samples) between an image and a [H, W, 3] array.
pub fn diff(a: &RgbImage, b: &Array3<u8>) -> (u8, usize) {
    assert_eq!(
        (a.height() as usize, a.width() as usize, 3),
        b.dim(),
        "image sizes differ"
    );
    let mut worst = (0, 0);
    for (x, y, p) in a.enumerate_pixels() {
        for c in 0..3 {
            let d = p.0[c].abs_diff(b[[y as usize, x as usize, c]]);
            worst = (worst.0.max(d), worst.1 + usize::from(d > 0));
        }
    }
    worst
}

/// An image as a [H, W, 3] array.
pub fn as_array(image: &RgbImage) -> Array3<u8> {
    let (w, h) = image.dimensions();
    Array3::from_shape_vec((h as usize, w as usize, 3), image.as_raw().clone()).unwrap()
}
