//! Images out: PNG files whose text chunks carry the generation parameters,
//! and `.npy` float arrays for exact comparisons.

use std::io::Write;
use std::path::Path;

use ndarray::ArrayView3;

/// Writes `image: [h, w, 3] f32` in [0, 1] as an 8-bit RGB PNG with one
/// `tEXt` chunk per `(key, value)` (iTXt when the value is not Latin-1).
pub fn write_png(
    path: &Path,
    image: ArrayView3<f32>,
    text: &[(String, String)],
) -> std::io::Result<()> {
    crate::staged::write_file(path, |file| encode_png(file, image, text))
}

/// The PNG [`write_png`] writes, into `out`.
pub fn encode_png(
    out: impl Write,
    image: ArrayView3<f32>,
    text: &[(String, String)],
) -> std::io::Result<()> {
    let (h, w, c) = image.dim();
    if c != 3 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{c} channels, expected 3"),
        ));
    }
    let to_io = |e: png::EncodingError| std::io::Error::other(e.to_string());
    let mut enc = png::Encoder::new(out, w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        if v.chars().all(|ch| (ch as u32) < 256) {
            enc.add_text_chunk(k.clone(), v.clone()).map_err(to_io)?;
        } else {
            enc.add_itxt_chunk(k.clone(), v.clone()).map_err(to_io)?;
        }
    }
    let mut writer = enc.write_header().map_err(to_io)?;
    writer.write_image_data(&to_bytes(image)).map_err(to_io)?;
    writer.finish().map_err(to_io)
}

/// `[.., 3] f32` in [0, 1] as 8-bit values, as the PNG stores them.
pub fn to_bytes<D: ndarray::Dimension>(image: ndarray::ArrayView<f32, D>) -> Vec<u8> {
    image
        .iter()
        .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

/// Writes a little-endian f32 `.npy` (format 1.0), C order.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    crate::staged::write_file(path, |f| encode_npy(f, shape, data))
}

/// The `.npy` [`write_npy`] writes, into `f`.
pub fn encode_npy(mut f: impl Write, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' aligned to 64 bytes.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for v in data {
        f.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Reads a little-endian f32 `.npy` (C order): shape and data.
pub fn read_npy(path: &Path) -> std::io::Result<(Vec<usize>, Vec<f32>)> {
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let bytes = std::fs::read(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported .npy version")),
    };
    let header = bytes
        .get(start..start + len)
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad(
            "only little-endian float32 C-order arrays are supported",
        ));
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape = shape_text
        .trim_start_matches([' ', '('])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad shape")))
        .collect::<Result<Vec<_>, _>>()?;
    let data = &bytes[start + len..];
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    if data.len() != count * 4 {
        return Err(bad("data length does not match the shape"));
    }
    Ok((
        shape,
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

/// Tiles equally sized images `[h, w, 3] f32` into rows of `cols`, with a
/// `gap`-pixel white border between them: `[rows·(h+gap)+gap, cols·(w+gap)+gap, 3]`.
pub fn grid(
    images: &[ndarray::Array3<f32>],
    cols: usize,
    gap: usize,
) -> Option<ndarray::Array3<f32>> {
    let first = images.first()?;
    let (h, w, c) = first.dim();
    if cols == 0 || images.iter().any(|i| i.dim() != (h, w, c)) {
        return None;
    }
    let rows = images.len().div_ceil(cols);
    let mut out =
        ndarray::Array3::from_elem((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 1.0f32);
    for (k, img) in images.iter().enumerate() {
        let (y, x) = (gap + (k / cols) * (h + gap), gap + (k % cols) * (w + gap));
        out.slice_mut(ndarray::s![y..y + h, x..x + w, ..])
            .assign(img);
    }
    Some(out)
}

/// `image: [h, w, c]` enlarged `k` times by repeating pixels (nearest
/// neighbour), so that small models' images stay visible in a grid.
pub fn upscale(image: ndarray::ArrayView3<f32>, k: usize) -> ndarray::Array3<f32> {
    let k = k.max(1);
    let (h, w, c) = image.dim();
    ndarray::Array3::from_shape_fn((h * k, w * k, c), |(y, x, ch)| image[[y / k, x / k, ch]])
}

/// Reads an 8-bit PNG as `[h, w, 3] f32` in [0, 1].
pub fn read_png(path: &Path) -> std::io::Result<ndarray::Array3<f32>> {
    let img = image::open(path)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    ndarray::Array3::from_shape_vec(
        (h as usize, w as usize, 3),
        img.into_raw()
            .into_iter()
            .map(|v| f32::from(v) / 255.0)
            .collect(),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))
}
