//! A small ISO-BMFF reader: just what packaging and its tests need from CMAF headers and fragments.
//!
//! It reads the init segment (`moov`: per track the timescale, `trex` defaults, handler and the RFC 6381 codec
//! string) and a fragment (`moof`: `tfdt`, `trun` sample durations and sync flags). Malformed input gives an error,
//! never a panic: these bytes come from a muxer today and may come from an uploaded file tomorrow.

/// A box header found in a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxRef<'a> {
    pub kind: [u8; 4],
    /// The payload (after the header).
    pub body: &'a [u8],
    /// Offset of the box header in the parent slice.
    pub offset: usize,
    /// Total size including the header.
    pub size: usize,
}

impl BoxRef<'_> {
    pub fn kind_str(&self) -> &str {
        std::str::from_utf8(&self.kind).unwrap_or("????")
    }
}

/// Why bytes could not be read as ISO-BMFF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmafError {
    #[error("truncated box at offset {0}")]
    Truncated(usize),
    #[error("missing `{0}` box")]
    Missing(&'static str),
    #[error("box `{0}` is malformed")]
    Malformed(&'static str),
}

/// Iterates the boxes of one level.
pub fn boxes(data: &[u8]) -> impl Iterator<Item = Result<BoxRef<'_>, CmafError>> + '_ {
    let mut pos = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= data.len() {
            return None;
        }
        let r = read_box(data, pos);
        match &r {
            Ok(b) => pos += b.size,
            Err(_) => failed = true,
        }
        Some(r)
    })
}

fn read_box(data: &[u8], pos: usize) -> Result<BoxRef<'_>, CmafError> {
    let rest = &data[pos..];
    if rest.len() < 8 {
        return Err(CmafError::Truncated(pos));
    }
    let size32 = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
    let kind = [rest[4], rest[5], rest[6], rest[7]];
    let (hdr, size) = match size32 {
        0 => (8u64, rest.len() as u64),
        1 => {
            if rest.len() < 16 {
                return Err(CmafError::Truncated(pos));
            }
            (16, be_u64(&rest[8..16]))
        }
        n => (8, n),
    };
    if size < hdr || size > rest.len() as u64 {
        return Err(CmafError::Truncated(pos));
    }
    Ok(BoxRef {
        kind,
        body: &rest[hdr as usize..size as usize],
        offset: pos,
        size: size as usize,
    })
}

/// The first child box of `kind` in `data`.
pub fn find<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<Option<BoxRef<'a>>, CmafError> {
    for b in boxes(data) {
        let b = b?;
        if &b.kind == kind {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Follows a path of box kinds from `data`.
pub fn find_path<'a>(data: &'a [u8], path: &[&[u8; 4]]) -> Result<Option<BoxRef<'a>>, CmafError> {
    let mut cur = data;
    let mut found = None;
    for k in path {
        match find(cur, k)? {
            Some(b) => {
                cur = b.body;
                found = Some(b);
            }
            None => return Ok(None),
        }
    }
    Ok(found)
}

/// The kinds of the top-level boxes, in order (e.g. `["ftyp", "moov"]`).
pub fn top_level_kinds(data: &[u8]) -> Result<Vec<String>, CmafError> {
    boxes(data)
        .map(|b| b.map(|b| b.kind_str().to_string()))
        .collect()
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// A byte cursor that fails instead of panicking.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Self { b, pos: 0, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CmafError> {
        if self.pos + n > self.b.len() {
            return Err(CmafError::Malformed(self.what));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CmafError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CmafError> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Result<u32, CmafError> {
        self.take(4).map(be_u32)
    }
    fn u64(&mut self) -> Result<u64, CmafError> {
        self.take(8).map(be_u64)
    }
    fn rest(&self) -> &'a [u8] {
        &self.b[self.pos.min(self.b.len())..]
    }
}

/// What the init segment says about one track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackInfo {
    pub track_id: u32,
    /// `vide`, `soun`, …
    pub handler: String,
    pub timescale: u32,
    /// Sample entry kind (`avc1`, `mp4a`, …).
    pub sample_entry: String,
    /// RFC 6381 codec string, when kiln knows how to build it for this sample entry.
    pub codec: Option<String>,
    pub width: Option<u16>,
    pub height: Option<u16>,
    pub default_sample_duration: u32,
    pub default_sample_flags: u32,
    /// Sample count of the init's sample tables (CMAF requires 0).
    pub stbl_sample_count: u32,
    /// `tkhd` duration (CMAF requires 0).
    pub tkhd_duration: u64,
}

/// The parts of an init segment (ftyp + moov) that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitInfo {
    pub major_brand: String,
    pub compatible_brands: Vec<String>,
    pub tracks: Vec<TrackInfo>,
    pub has_mvex: bool,
    pub has_mdat: bool,
    /// `mvhd` duration (CMAF requires 0).
    pub movie_duration: u64,
    /// Track ids with a `trex` in `mvex`.
    pub trex_tracks: Vec<u32>,
}

impl InitInfo {
    /// The codec strings of all tracks joined with `,`.
    pub fn codecs(&self) -> Option<String> {
        let v: Option<Vec<String>> = self.tracks.iter().map(|t| t.codec.clone()).collect();
        v.map(|v| v.join(","))
    }

    fn track(&self, id: u32) -> Option<&TrackInfo> {
        self.tracks
            .iter()
            .find(|t| t.track_id == id)
            .or(self.tracks.first())
    }
}

/// Parses an init segment.
// Long by design: a box parser: one arm per ISO BMFF box it reads.
pub fn parse_init(data: &[u8]) -> Result<InitInfo, CmafError> {
    let ftyp = find(data, b"ftyp")?.ok_or(CmafError::Missing("ftyp"))?;
    let mut c = Cursor::new(ftyp.body, "ftyp");
    let major_brand = String::from_utf8_lossy(c.take(4)?).into_owned();
    c.u32()?;
    let compatible_brands = c
        .rest()
        .chunks_exact(4)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    let moov = find(data, b"moov")?.ok_or(CmafError::Missing("moov"))?;
    let has_mdat = find(data, b"mdat")?.is_some();
    let mvex = find(moov.body, b"mvex")?;
    let mut trex = Vec::new();
    if let Some(mvex) = mvex {
        for b in boxes(mvex.body) {
            let b = b?;
            if &b.kind == b"trex" {
                let mut c = Cursor::new(b.body, "trex");
                c.u32()?;
                let id = c.u32()?;
                c.u32()?;
                let dur = c.u32()?;
                c.u32()?;
                let flags = c.u32()?;
                trex.push((id, dur, flags));
            }
        }
    }
    let mut tracks = Vec::new();
    for b in boxes(moov.body) {
        let b = b?;
        if &b.kind != b"trak" {
            continue;
        }
        let tkhd = find(b.body, b"tkhd")?.ok_or(CmafError::Missing("tkhd"))?;
        let mut c = Cursor::new(tkhd.body, "tkhd");
        let v = c.u8()?;
        c.take(3)?;
        c.take(if v == 1 { 16 } else { 8 })?;
        let track_id = c.u32()?;
        c.u32()?;
        let tkhd_duration = if v == 1 {
            c.u64()?
        } else {
            u64::from(c.u32()?)
        };
        let mdia = find(b.body, b"mdia")?.ok_or(CmafError::Missing("mdia"))?;
        let mdhd = find(mdia.body, b"mdhd")?.ok_or(CmafError::Missing("mdhd"))?;
        let mut c = Cursor::new(mdhd.body, "mdhd");
        let v = c.u8()?;
        c.take(3)?;
        c.take(if v == 1 { 16 } else { 8 })?;
        let timescale = c.u32()?;
        let hdlr = find(mdia.body, b"hdlr")?.ok_or(CmafError::Missing("hdlr"))?;
        let mut c = Cursor::new(hdlr.body, "hdlr");
        c.take(8)?;
        let handler = String::from_utf8_lossy(c.take(4)?).into_owned();
        let stbl = find_path(mdia.body, &[b"minf", b"stbl"])?.ok_or(CmafError::Missing("stbl"))?;
        let stsd = find(stbl.body, b"stsd")?.ok_or(CmafError::Missing("stsd"))?;
        let mut c = Cursor::new(stsd.body, "stsd");
        c.take(8)?;
        let entry = boxes(c.rest())
            .next()
            .ok_or(CmafError::Missing("sample entry"))??;
        let sample_entry = entry.kind_str().to_string();
        let (codec, width, height) = sample_entry_codec(&entry)?;
        let stbl_sample_count = match find(stbl.body, b"stsz")? {
            Some(stsz) => {
                let mut c = Cursor::new(stsz.body, "stsz");
                c.take(8)?;
                c.u32()?
            }
            None => 0,
        };
        let (dd, df) = trex
            .iter()
            .find(|t| t.0 == track_id)
            .map(|t| (t.1, t.2))
            .unwrap_or((0, 0));
        tracks.push(TrackInfo {
            track_id,
            handler,
            timescale,
            sample_entry,
            codec,
            width,
            height,
            default_sample_duration: dd,
            default_sample_flags: df,
            stbl_sample_count,
            tkhd_duration,
        });
    }
    if tracks.is_empty() {
        return Err(CmafError::Missing("trak"));
    }
    let mvhd = find(moov.body, b"mvhd")?.ok_or(CmafError::Missing("mvhd"))?;
    let mut c = Cursor::new(mvhd.body, "mvhd");
    let v = c.u8()?;
    c.take(3)?;
    c.take(if v == 1 { 16 } else { 8 })?;
    c.u32()?;
    let movie_duration = if v == 1 {
        c.u64()?
    } else {
        u64::from(c.u32()?)
    };
    Ok(InitInfo {
        major_brand,
        compatible_brands,
        tracks,
        has_mvex: mvex.is_some(),
        has_mdat,
        movie_duration,
        trex_tracks: trex.iter().map(|t| t.0).collect(),
    })
}

type EntryCodec = (Option<String>, Option<u16>, Option<u16>);

fn sample_entry_codec(entry: &BoxRef<'_>) -> Result<EntryCodec, CmafError> {
    match &entry.kind {
        b"avc1" | b"avc3" => {
            // VisualSampleEntry: 6 reserved + 2 data_reference_index + 16 pre_defined/reserved, then width, height,
            // then 50 more bytes before the child boxes (78 bytes in all).
            let mut c = Cursor::new(entry.body, "avc1");
            c.take(24)?;
            let w = c.u16()?;
            let h = c.u16()?;
            c.take(50)?;
            let avcc = find(c.rest(), b"avcC")?.ok_or(CmafError::Missing("avcC"))?;
            let mut a = Cursor::new(avcc.body, "avcC");
            a.u8()?;
            let (p, k, l) = (a.u8()?, a.u8()?, a.u8()?);
            Ok((
                Some(format!("{}.{p:02x}{k:02x}{l:02x}", entry.kind_str())),
                Some(w),
                Some(h),
            ))
        }
        b"mp4a" => {
            let mut c = Cursor::new(entry.body, "mp4a");
            c.take(28)?;
            let esds = find(c.rest(), b"esds")?.ok_or(CmafError::Missing("esds"))?;
            Ok((Some(esds_codec(esds.body)?), None, None))
        }
        _ => Ok((None, None, None)),
    }
}

/// `mp4a.<OTI hex>.<AOT>` from an `esds` box body.
fn esds_codec(body: &[u8]) -> Result<String, CmafError> {
    let mut c = Cursor::new(body, "esds");
    c.take(4)?;
    fn desc_len(c: &mut Cursor<'_>) -> Result<usize, CmafError> {
        let mut len = 0usize;
        for _ in 0..4 {
            let b = c.u8()?;
            len = (len << 7) | usize::from(b & 0x7f);
            if b & 0x80 == 0 {
                break;
            }
        }
        Ok(len)
    }
    if c.u8()? != 0x03 {
        return Err(CmafError::Malformed("esds"));
    }
    desc_len(&mut c)?;
    c.u16()?;
    let flags = c.u8()?;
    if flags & 0x80 != 0 {
        c.u16()?;
    }
    if flags & 0x40 != 0 {
        let n = c.u8()?;
        c.take(usize::from(n))?;
    }
    if flags & 0x20 != 0 {
        c.u16()?;
    }
    if c.u8()? != 0x04 {
        return Err(CmafError::Malformed("esds"));
    }
    desc_len(&mut c)?;
    let oti = c.u8()?;
    c.take(12)?;
    if oti != 0x40 {
        return Ok(format!("mp4a.{oti:02x}"));
    }
    if c.u8()? != 0x05 {
        return Err(CmafError::Malformed("esds"));
    }
    desc_len(&mut c)?;
    let b0 = c.u8()?;
    let mut aot = b0 >> 3;
    if aot == 31 {
        let b1 = c.u8()?;
        aot = 32 + (((b0 & 0x07) << 3) | (b1 >> 5));
    }
    Ok(format!("mp4a.40.{aot}"))
}

/// Sample flag bit: `sample_is_non_sync_sample`.
pub const NON_SYNC: u32 = 0x0001_0000;

/// What a fragment (one or more moof+mdat pairs: a part, or a whole segment) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentInfo {
    /// `tfdt` of the first `traf`, in the track's timescale.
    pub base_decode_time: u64,
    pub sample_count: u32,
    /// Sum of sample durations, in the track's timescale.
    pub duration: u64,
    pub timescale: u32,
    /// Whether the first sample is a sync sample.
    pub starts_with_sync: bool,
    /// Indices (in this fragment) of every sync sample.
    pub sync_samples: Vec<u32>,
    /// `tfdt` of each moof, in order, with its sample duration sum (for continuity checks).
    pub moofs: Vec<(u64, u64)>,
    /// Top-level box kinds, in order.
    pub kinds: Vec<String>,
}

impl FragmentInfo {
    pub fn duration_ns(&self) -> u64 {
        ticks_to_ns(self.duration, self.timescale)
    }
    pub fn start_ns(&self) -> u64 {
        ticks_to_ns(self.base_decode_time, self.timescale)
    }
}

/// Converts ticks of `timescale` to nanoseconds (rounded down).
pub fn ticks_to_ns(ticks: u64, timescale: u32) -> u64 {
    if timescale == 0 {
        return 0;
    }
    ((u128::from(ticks) * 1_000_000_000) / u128::from(timescale)) as u64
}

/// Parses the `moof` boxes of a fragment, using the init's defaults.
// Long by design: a box parser: one arm per ISO BMFF box it reads.
pub fn parse_fragment(data: &[u8], init: &InitInfo) -> Result<FragmentInfo, CmafError> {
    let mut info = FragmentInfo {
        base_decode_time: 0,
        sample_count: 0,
        duration: 0,
        timescale: 0,
        starts_with_sync: false,
        sync_samples: Vec::new(),
        moofs: Vec::new(),
        kinds: Vec::new(),
    };
    let mut first = true;
    for b in boxes(data) {
        let b = b?;
        info.kinds.push(b.kind_str().to_string());
        if &b.kind != b"moof" {
            continue;
        }
        let traf = find(b.body, b"traf")?.ok_or(CmafError::Missing("traf"))?;
        let tfhd = find(traf.body, b"tfhd")?.ok_or(CmafError::Missing("tfhd"))?;
        let mut c = Cursor::new(tfhd.body, "tfhd");
        let tf_flags = c.u32()? & 0x00ff_ffff;
        let track_id = c.u32()?;
        let track = init.track(track_id).ok_or(CmafError::Missing("track"))?;
        let mut def_dur = track.default_sample_duration;
        let mut def_flags = track.default_sample_flags;
        if tf_flags & 0x1 != 0 {
            c.u64()?;
        }
        if tf_flags & 0x2 != 0 {
            c.u32()?;
        }
        if tf_flags & 0x8 != 0 {
            def_dur = c.u32()?;
        }
        if tf_flags & 0x10 != 0 {
            c.u32()?;
        }
        if tf_flags & 0x20 != 0 {
            def_flags = c.u32()?;
        }
        let tfdt = find(traf.body, b"tfdt")?.ok_or(CmafError::Missing("tfdt"))?;
        let mut c = Cursor::new(tfdt.body, "tfdt");
        let v = c.u8()?;
        c.take(3)?;
        let bdt = if v == 1 {
            c.u64()?
        } else {
            u64::from(c.u32()?)
        };
        let mut moof_dur = 0u64;
        for tb in boxes(traf.body) {
            let tb = tb?;
            if &tb.kind != b"trun" {
                continue;
            }
            let mut c = Cursor::new(tb.body, "trun");
            let tr_flags = c.u32()? & 0x00ff_ffff;
            let n = c.u32()?;
            if tr_flags & 0x1 != 0 {
                c.u32()?;
            }
            let first_flags = if tr_flags & 0x4 != 0 {
                Some(c.u32()?)
            } else {
                None
            };
            for i in 0..n {
                let dur = if tr_flags & 0x100 != 0 {
                    c.u32()?
                } else {
                    def_dur
                };
                if tr_flags & 0x200 != 0 {
                    c.u32()?;
                }
                let flags = if tr_flags & 0x400 != 0 {
                    c.u32()?
                } else if i == 0 {
                    first_flags.unwrap_or(def_flags)
                } else {
                    def_flags
                };
                let flags = if i == 0 {
                    first_flags.unwrap_or(flags)
                } else {
                    flags
                };
                if tr_flags & 0x800 != 0 {
                    c.u32()?;
                }
                if flags & NON_SYNC == 0 {
                    info.sync_samples.push(info.sample_count);
                }
                info.sample_count += 1;
                moof_dur += u64::from(dur);
            }
        }
        if first {
            info.base_decode_time = bdt;
            info.timescale = track.timescale;
            info.starts_with_sync = info.sync_samples.first() == Some(&0);
            first = false;
        }
        info.duration += moof_dur;
        info.moofs.push((bdt, moof_dur));
    }
    if first {
        return Err(CmafError::Missing("moof"));
    }
    Ok(info)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders for hand-made boxes, used by the unit tests.

    pub fn mkbox(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(body);
        v
    }

    pub fn full(kind: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut b = vec![version];
        b.extend_from_slice(&flags.to_be_bytes()[1..]);
        b.extend_from_slice(body);
        mkbox(kind, &b)
    }

    /// A one-track video init: timescale 90000, avcC High@3.1, trex default flags non-sync.
    pub fn video_init() -> Vec<u8> {
        let ftyp = mkbox(b"ftyp", b"cmf2\0\0\0\0iso6cmfc");
        let mut tkhd = vec![0u8; 8];
        tkhd.extend_from_slice(&1u32.to_be_bytes());
        tkhd.extend_from_slice(&[0u8; 68]);
        let mut mdhd = vec![0u8; 8];
        mdhd.extend_from_slice(&90_000u32.to_be_bytes());
        mdhd.extend_from_slice(&[0u8; 8]);
        let hdlr = full(b"hdlr", 0, 0, b"\0\0\0\0vide\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let avcc = mkbox(b"avcC", &[1, 0x64, 0x00, 0x1f, 0xff, 0xe0, 0x00]);
        let mut avc1 = vec![0u8; 24];
        avc1.extend_from_slice(&640u16.to_be_bytes());
        avc1.extend_from_slice(&360u16.to_be_bytes());
        avc1.extend_from_slice(&[0u8; 50]);
        avc1.extend_from_slice(&avcc);
        let mut stsd_body = 1u32.to_be_bytes().to_vec();
        stsd_body.extend_from_slice(&mkbox(b"avc1", &avc1));
        let stsd = full(b"stsd", 0, 0, &stsd_body);
        let stsz = full(b"stsz", 0, 0, &[0u8; 8]);
        let stbl = mkbox(b"stbl", &[stsd, stsz].concat());
        let minf = mkbox(b"minf", &stbl);
        let mdia = mkbox(b"mdia", &[full(b"mdhd", 0, 0, &mdhd), hdlr, minf].concat());
        let trak = mkbox(b"trak", &[full(b"tkhd", 0, 0, &tkhd), mdia].concat());
        let mvhd = full(b"mvhd", 0, 0, &[0u8; 96]);
        let mut trex = Vec::new();
        for v in [1u32, 1, 3000, 0, 0x0001_0000] {
            trex.extend_from_slice(&v.to_be_bytes());
        }
        let mvex = mkbox(b"mvex", &full(b"trex", 0, 0, &trex));
        let moov = mkbox(b"moov", &[mvhd, trak, mvex].concat());
        [ftyp, moov].concat()
    }

    /// moof+mdat with `n` samples of 3000 ticks, first sample sync iff `key`.
    pub fn video_fragment(tfdt: u64, n: u32, key: bool) -> Vec<u8> {
        let tfhd = full(b"tfhd", 0, 0x02_0000, &1u32.to_be_bytes());
        let tfdt = full(b"tfdt", 1, 0, &tfdt.to_be_bytes());
        let mut trun = n.to_be_bytes().to_vec();
        trun.extend_from_slice(&0u32.to_be_bytes()); // data offset
        trun.extend_from_slice(&(if key { 0x0200_0000u32 } else { 0x0101_0000 }).to_be_bytes());
        for _ in 0..n {
            trun.extend_from_slice(&3000u32.to_be_bytes());
        }
        let trun = full(b"trun", 0, 0x105, &trun);
        let traf = mkbox(b"traf", &[tfhd, tfdt, trun].concat());
        let moof = mkbox(
            b"moof",
            &[full(b"mfhd", 0, 0, &1u32.to_be_bytes()), traf].concat(),
        );
        [moof, mkbox(b"mdat", &vec![0u8; n as usize])].concat()
    }
}

#[cfg(test)]
mod tests;
