//! How much memory a generation needs, checked before anything is allocated:
//! a size asked for on the command line (or by a server request) must be
//! refused with an error, not end in an aborted allocation.
//!
//! The estimate counts what a generation must hold at once: the latents and
//! the scheduler's copies of them, the UNet batch going in and out, the
//! decoded images in f32 and as 8-bit pixels, and the VAE decoder's widest
//! full-resolution activations (its last two up blocks run at the output
//! size with up to `block_out_channels[1]` channels; a convolution's input
//! and output and a residual are alive together). It leaves out the weights
//! and the UNet's own activations (at latent resolution), so it is meant as
//! a floor rather than a prediction: a request above it cannot run, one
//! below it may still need more.

/// Copies of the latents alive at once: the latents, the noise, the model
/// output and up to three previous outputs (PNDM and the multistep solvers).
const LATENT_COPIES: u64 = 6;

/// Activations of the decoder's widest full-resolution layer alive at once.
const DECODER_LIVE_TENSORS: u64 = 3;

/// The sizes that decide a generation's memory.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// Images generated together.
    pub images: usize,
    /// Rows of each UNet batch: `images`, or twice that with guidance.
    pub unet_rows: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Output width in pixels.
    pub width: usize,
    /// Pixels per latent along each side (the VAE factor).
    pub factor: usize,
    /// Channels of the decoder's widest full-resolution layer.
    pub decoder_channels: usize,
}

impl Footprint {
    /// The floor in bytes; `None` when it does not even fit in 64 bits.
    pub fn bytes(&self) -> Option<u64> {
        let f = u64::try_from(self.factor.max(1)).ok()?;
        let n = u64::try_from(self.images).ok()?;
        let rows = u64::try_from(self.unet_rows).ok()?;
        let pixels = u64::try_from(self.height)
            .ok()?
            .checked_mul(u64::try_from(self.width).ok()?)?;
        let latent = (pixels / (f * f)).checked_mul(4 * 4)?; // 4 channels of f32
        let latents = latent
            .checked_mul(n.checked_mul(LATENT_COPIES)?)?
            .checked_add(latent.checked_mul(rows.checked_mul(2)?)?)?;
        let images = pixels.checked_mul(n)?.checked_mul(3 * 4 + 3)?;
        let channels = u64::try_from(self.decoder_channels).ok()?;
        let decoder = pixels
            .checked_mul(channels)?
            .checked_mul(4 * DECODER_LIVE_TENSORS)?;
        latents.checked_add(images)?.checked_add(decoder)
    }
}

/// The memory the kernel says can be had without swapping
/// (`MemAvailable` in `/proc/meminfo`), when it says.
pub fn available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&info)
}

fn parse_mem_available(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd(images: usize, side: usize) -> Footprint {
        Footprint {
            images,
            unet_rows: 2 * images,
            height: side,
            width: side,
            factor: 8,
            decoder_channels: 256,
        }
    }

    #[test]
    fn counts_each_part_by_hand() {
        // 512×512, one guided image: latents 64×64×4 f32 = 64 KiB, 6 copies
        // plus 2 rows in and out; pixels 262,144 × (12 + 3) bytes; the
        // decoder 262,144 × 256 channels × 4 bytes × 3 tensors.
        let latent = 64 * 64 * 4 * 4;
        let expected = latent * 6 + latent * 4 + 262_144 * 15 + 262_144 * 256 * 12;
        assert_eq!(sd(1, 512).bytes(), Some(expected));
        // 805 MB: within any machine that runs SD at all.
        assert!(expected < 900_000_000);
    }

    #[test]
    fn overflow_is_none_not_a_wrap() {
        assert_eq!(sd(usize::MAX, 1 << 20).bytes(), None);
        assert!(sd(1, 100_000).bytes().unwrap() > 30_000_000_000_000);
    }

    #[test]
    fn reads_mem_available() {
        let info = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(info), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
    }
}
