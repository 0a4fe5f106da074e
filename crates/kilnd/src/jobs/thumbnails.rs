//! A finished job's thumbnails: which frames count ([`select`]: one per interval, inside the encoded video), and
//! the files made from them ([`write`]): `poster.jpg`, `sprite.jpg` (the scrubbing sheet) and `thumbnails.vtt`.

use std::path::Path;

use image::{imageops, RgbImage};

/// Tile width in the sprite sheet, and tiles per row.
const TILE_WIDTH: u32 = 160;
const SPRITE_COLUMNS: u32 = 10;
/// JPEG quality of the poster and the sprite.
const JPEG_QUALITY: u8 = 85;
/// The poster is the thumbnail nearest this fraction of the video.
const POSTER_AT: f64 = 0.1;

/// One frame the pipeline's thumbnail branch kept (packed RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    pub pts_ns: u64,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Why the thumbnails could not be written (the text is what `JobStatus.error` shows).
#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("a thumbnail frame has the wrong size")]
    WrongSize,
    #[error("thumbnails: {0}")]
    Io(#[from] std::io::Error),
    #[error("thumbnails: {0}")]
    Encode(#[from] image::ImageError),
}

/// Keeps one frame per `interval_s` (the first of each interval) inside the first `encoded_s` seconds: a frame
/// repeated at the very end does not count.
pub(super) fn select(frames: &mut Vec<Frame>, interval_s: u32, encoded_s: f64) {
    let step = u64::from(interval_s.max(1)) * 1_000_000_000;
    let end_ns = (encoded_s * 1e9) as u64;
    let mut seen = std::collections::BTreeSet::new();
    frames.retain(|f| f.pts_ns < end_ns && seen.insert(f.pts_ns / step));
}

fn image(f: &Frame) -> Result<RgbImage, ThumbnailError> {
    RgbImage::from_raw(f.width, f.height, f.rgb.clone()).ok_or(ThumbnailError::WrongSize)
}

fn write_jpeg(img: &RgbImage, path: &Path) -> Result<(), ThumbnailError> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, JPEG_QUALITY).encode_image(img)?;
    Ok(())
}

/// Writes into `out` the poster (the thumbnail nearest 10 % into the video, full thumbnail size), the sprite
/// (every thumbnail, 160 px wide, 10 per row) and the WebVTT scrubbing index. Returns the thumbnail count;
/// nothing is written for no frames.
pub(super) fn write(
    out: &Path,
    frames: &[Frame],
    interval_s: u32,
    duration_s: f64,
) -> Result<u32, ThumbnailError> {
    let target = (duration_s * POSTER_AT * 1e9) as u64;
    let Some(poster) = frames.iter().min_by_key(|f| f.pts_ns.abs_diff(target)) else {
        return Ok(0);
    };
    write_jpeg(&image(poster)?, &out.join("poster.jpg"))?;
    let (w, h) = (poster.width, poster.height);
    let tile_h = ((u64::from(h) * u64::from(TILE_WIDTH) / u64::from(w.max(1))) as u32).max(1);
    let n = frames.len() as u32;
    let cols = SPRITE_COLUMNS.min(n);
    let rows = n.div_ceil(SPRITE_COLUMNS);
    let mut sprite = RgbImage::new(TILE_WIDTH * cols, tile_h * rows);
    for (i, f) in frames.iter().enumerate() {
        let tile = imageops::resize(
            &image(f)?,
            TILE_WIDTH,
            tile_h,
            imageops::FilterType::Triangle,
        );
        let i = i as u32;
        imageops::replace(
            &mut sprite,
            &tile,
            i64::from(i % SPRITE_COLUMNS * TILE_WIDTH),
            i64::from(i / SPRITE_COLUMNS * tile_h),
        );
    }
    write_jpeg(&sprite, &out.join("sprite.jpg"))?;
    std::fs::write(
        out.join("thumbnails.vtt"),
        kiln_llhls::vod::thumbnails_vtt(
            n,
            interval_s,
            duration_s,
            (TILE_WIDTH, tile_h),
            SPRITE_COLUMNS,
            "sprite.jpg",
        ),
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// A flat frame whose colour encodes `shade`.
    fn frame(pts_ns: u64, shade: u8) -> Frame {
        Frame {
            pts_ns,
            width: 64,
            height: 36,
            rgb: [shade, 255 - shade, 128].repeat(64 * 36),
        }
    }

    #[test]
    fn one_frame_per_interval_inside_the_video() {
        let mut frames: Vec<Frame> = [0, S / 2, 5 * S, 7 * S, 10 * S, 12 * S]
            .iter()
            .map(|&t| frame(t, 0))
            .collect();
        // a 12 s video, every 5 s: 0 s, 5 s, 10 s (12 s is the end, repeated: out)
        select(&mut frames, 5, 12.0);
        let kept: Vec<u64> = frames.iter().map(|f| f.pts_ns / S).collect();
        assert_eq!(kept, [0, 5, 10]);
    }

    #[test]
    fn poster_sprite_and_index_are_written() {
        let dir = tempfile::tempdir().unwrap();
        // 12 thumbnails every 5 s of a 60 s video; the poster is the one nearest 6 s (the one at 5 s)
        let frames: Vec<Frame> = (0..12u8)
            .map(|i| frame(u64::from(i) * 5 * S, i * 20))
            .collect();
        assert_eq!(write(dir.path(), &frames, 5, 60.0).unwrap(), 12);
        let poster = image::open(dir.path().join("poster.jpg"))
            .unwrap()
            .to_rgb8();
        assert_eq!(poster.dimensions(), (64, 36));
        let px = poster.get_pixel(32, 18).0;
        assert!(
            px[0].abs_diff(20) <= 8 && px[1].abs_diff(235) <= 8,
            "the poster is the frame at 5 s: {px:?}"
        );
        // 160×90 tiles, 10 per row: 2 rows
        let sprite = image::open(dir.path().join("sprite.jpg")).unwrap();
        assert_eq!((sprite.width(), sprite.height()), (1600, 180));
        let vtt = std::fs::read_to_string(dir.path().join("thumbnails.vtt")).unwrap();
        assert!(vtt.starts_with("WEBVTT"), "{vtt}");
        assert_eq!(vtt.matches("sprite.jpg#xywh=").count(), 12, "{vtt}");
        assert!(vtt.contains("sprite.jpg#xywh=160,90,160,90"), "{vtt}");
    }

    #[test]
    fn no_frames_write_nothing_and_a_bad_frame_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write(dir.path(), &[], 5, 10.0).unwrap(), 0);
        assert!(!dir.path().join("poster.jpg").exists());
        let mut bad = frame(0, 0);
        bad.rgb.truncate(10);
        let err = write(dir.path(), &[bad], 5, 10.0).unwrap_err();
        assert!(matches!(err, ThumbnailError::WrongSize));
        assert_eq!(err.to_string(), "a thumbnail frame has the wrong size");
    }
}
