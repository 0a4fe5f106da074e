//! A job's thumbnails: kept as they arrive ([`Collected`]: a sprite tile per frame, and the one frame the poster
//! may be), which count ([`select`]: one per interval, inside the encoded video), and the files made from them
//! ([`write`]): `poster.jpg`, the scrubbing sheets `sprite.jpg` (then `sprite-1.jpg`, … for a long video) and
//! `thumbnails.vtt`.

use std::path::Path;

use image::{imageops, RgbImage};

/// Tile width in the sprite sheet, and tiles per row.
const TILE_WIDTH: u32 = 160;
const SPRITE_COLUMNS: u32 = 10;
/// Rows of one sprite sheet at most (a JPEG side is at most 65,535 pixels; 100 rows of 16:9 tiles is 9,000).
const SHEET_ROWS: u32 = 100;
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

/// A transcode's thumbnails as they arrive. A frame (640 px wide, 0.7 MB at 16:9, 2.2 MB upright) is kept only
/// while it is the poster's best candidate; every frame leaves a sprite tile (160 px wide, 16 times smaller), so
/// a two-hour film at one thumbnail a second holds about 300 MB, not 5 GB.
#[derive(Debug, Default)]
pub(super) struct Collected {
    /// Where the poster is taken (10 % into the video).
    poster_at_ns: u64,
    /// The frame nearest `poster_at_ns` so far.
    poster: Option<Frame>,
    /// Every frame, at tile size.
    tiles: Vec<Frame>,
}

impl Collected {
    /// For a video of `duration_s` (its probed duration).
    pub(super) fn new(duration_s: f64) -> Self {
        Collected {
            poster_at_ns: (duration_s * POSTER_AT * 1e9) as u64,
            ..Collected::default()
        }
    }

    pub(super) fn push(&mut self, frame: Frame) -> Result<(), ThumbnailError> {
        let (w, h) = (frame.width, frame.height);
        let tile_h = ((u64::from(h) * u64::from(TILE_WIDTH) / u64::from(w.max(1))) as u32).max(1);
        let tile = imageops::resize(
            &image(&frame)?,
            TILE_WIDTH,
            tile_h,
            imageops::FilterType::Triangle,
        );
        self.tiles.push(Frame {
            pts_ns: frame.pts_ns,
            width: TILE_WIDTH,
            height: tile_h,
            rgb: tile.into_raw(),
        });
        let at = self.poster_at_ns;
        if self
            .poster
            .as_ref()
            .is_none_or(|p| frame.pts_ns.abs_diff(at) < p.pts_ns.abs_diff(at))
        {
            self.poster = Some(frame);
        }
        Ok(())
    }

    /// The tiles kept, one per interval inside the first `encoded_s` seconds ([`select`]).
    pub(super) fn select(&mut self, interval_s: u32, encoded_s: f64) {
        select(&mut self.tiles, interval_s, encoded_s);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }
}

/// The name of sprite sheet `k`: `sprite.jpg` for the first (the one a job's links name), then `sprite-1.jpg`, ….
pub(super) fn sheet_name(k: u32) -> String {
    if k == 0 {
        "sprite.jpg".to_string()
    } else {
        format!("sprite-{k}.jpg")
    }
}

fn write_jpeg(img: &RgbImage, path: &Path) -> Result<(), ThumbnailError> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, JPEG_QUALITY).encode_image(img)?;
    Ok(())
}

/// Writes into `out` the poster (the frame nearest 10 % into the video, full thumbnail size), the sprite sheets
/// (every tile, 10 per row, at most [`SHEET_ROWS`] rows a sheet) and the WebVTT scrubbing index. Returns the
/// thumbnail count; nothing is written for no tiles.
pub(super) fn write(
    out: &Path,
    thumbs: &Collected,
    interval_s: u32,
    duration_s: f64,
) -> Result<u32, ThumbnailError> {
    write_sheets(out, thumbs, (interval_s, duration_s), SHEET_ROWS)
}

/// [`write`] with sheets of at most `sheet_rows` rows (and never taller than a JPEG may be).
fn write_sheets(
    out: &Path,
    thumbs: &Collected,
    (interval_s, duration_s): (u32, f64),
    sheet_rows: u32,
) -> Result<u32, ThumbnailError> {
    let (Some(poster), Some(first)) = (&thumbs.poster, thumbs.tiles.first()) else {
        return Ok(0);
    };
    write_jpeg(&image(poster)?, &out.join("poster.jpg"))?;
    let tile_h = first.height;
    let rows_per_sheet = sheet_rows.min(u32::from(u16::MAX) / tile_h.max(1)).max(1);
    let per_sheet = SPRITE_COLUMNS * rows_per_sheet;
    let n = thumbs.tiles.len() as u32;
    for (k, sheet) in thumbs.tiles.chunks(per_sheet as usize).enumerate() {
        let count = sheet.len() as u32;
        let cols = SPRITE_COLUMNS.min(count);
        let rows = count.div_ceil(SPRITE_COLUMNS);
        let mut sprite = RgbImage::new(TILE_WIDTH * cols, tile_h * rows);
        for (i, t) in sheet.iter().enumerate() {
            let i = i as u32;
            imageops::replace(
                &mut sprite,
                &image(t)?,
                i64::from(i % SPRITE_COLUMNS * TILE_WIDTH),
                i64::from(i / SPRITE_COLUMNS * tile_h),
            );
        }
        write_jpeg(&sprite, &out.join(sheet_name(k as u32)))?;
    }
    std::fs::write(
        out.join("thumbnails.vtt"),
        kiln_llhls::vod::thumbnails_vtt(
            n,
            interval_s,
            duration_s,
            (TILE_WIDTH, tile_h),
            (SPRITE_COLUMNS, per_sheet),
            &sheet_name,
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
        let mut thumbs = Collected::new(60.0);
        for i in 0..12u8 {
            thumbs.push(frame(u64::from(i) * 5 * S, i * 20)).unwrap();
        }
        // what is kept: the poster's frame at full size, the rest as tiles
        assert_eq!(thumbs.poster.as_ref().unwrap().pts_ns, 5 * S);
        assert!(thumbs
            .tiles
            .iter()
            .all(|t| (t.width, t.height) == (160, 90)));
        assert_eq!(write(dir.path(), &thumbs, 5, 60.0).unwrap(), 12);
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
        assert_eq!(
            write(dir.path(), &Collected::new(10.0), 5, 10.0).unwrap(),
            0
        );
        assert!(!dir.path().join("poster.jpg").exists());
        let mut bad = frame(0, 0);
        bad.rgb.truncate(10);
        let err = Collected::new(10.0).push(bad).unwrap_err();
        assert!(matches!(err, ThumbnailError::WrongSize));
        assert_eq!(err.to_string(), "a thumbnail frame has the wrong size");
    }

    /// A long video's tiles go on more sheets (one JPEG side is at most 65,535 px), each named in the index; the
    /// first keeps the name a job's links give.
    #[test]
    fn a_long_video_gets_several_sheets() {
        let dir = tempfile::tempdir().unwrap();
        let mut thumbs = Collected::new(3000.0);
        // sheets of 2 rows here (100 in a job): 45 tiles are two full sheets and a row of 5
        let n = SPRITE_COLUMNS * 2 * 2 + 5;
        for i in 0..n {
            thumbs.push(frame(u64::from(i) * S, 0)).unwrap();
        }
        assert_eq!(
            write_sheets(dir.path(), &thumbs, (1, f64::from(n)), 2).unwrap(),
            n
        );
        let first = image::open(dir.path().join("sprite.jpg")).unwrap();
        assert_eq!((first.width(), first.height()), (1600, 180));
        assert!(dir.path().join("sprite-1.jpg").exists());
        let third = image::open(dir.path().join("sprite-2.jpg")).unwrap();
        assert_eq!((third.width(), third.height()), (800, 90));
        let vtt = std::fs::read_to_string(dir.path().join("thumbnails.vtt")).unwrap();
        assert_eq!(vtt.matches("sprite-1.jpg#xywh=").count(), 20);
        assert_eq!(vtt.matches("sprite-2.jpg#xywh=").count(), 5);
        assert!(
            vtt.contains("sprite-2.jpg#xywh=0,0,160,90"),
            "the third sheet from its top"
        );
    }
}
