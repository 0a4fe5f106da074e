//! Finding and configuring elements. Every element is made by factory name with typed properties; a missing
//! plugin is a clear [`MediaError::MissingElement`] naming the package to install.

use gst::prelude::*;

use crate::MediaError;

/// Makes an element, or says which package is missing.
pub fn make(factory: &'static str, name: &str) -> Result<gst::Element, MediaError> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|_| MediaError::MissingElement(factory, package_of(factory)))
}

/// Makes an element whose factory name was chosen at run time (the selection table).
pub fn make_dyn(factory: &str, name: &str) -> Result<gst::Element, MediaError> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|_| MediaError::MissingDynamic(factory.to_string()))
}

/// Whether an element factory is installed.
pub fn exists(factory: &str) -> bool {
    gst::ElementFactory::find(factory).is_some()
}

/// The Debian package that ships a factory (for error messages).
pub fn package_of(factory: &str) -> &'static str {
    match factory {
        "x264enc" => "gstreamer1.0-plugins-ugly",
        "voaacenc" | "h264parse" | "videoparsersbad" => "gstreamer1.0-plugins-bad",
        "avenc_aac" => "gstreamer1.0-libav",
        "aacparse" | "clockoverlay" => "gstreamer1.0-plugins-good / -base",
        "cmafmux" => "kiln's statically linked gst-plugin-fmp4",
        _ => "gstreamer1.0-plugins-base",
    }
}

/// The AAC encoder to use: `voaacenc` cuts frames on time (no hidden latency); `avenc_aac` is the fallback.
pub fn aac_encoder() -> Result<&'static str, MediaError> {
    ["voaacenc", "avenc_aac"]
        .into_iter()
        .find(|f| exists(f))
        .ok_or(MediaError::MissingElement(
            "voaacenc",
            "gstreamer1.0-plugins-bad or gstreamer1.0-libav",
        ))
}

/// A capsfilter with the given caps.
pub fn capsfilter(name: &str, caps: gst::Caps) -> Result<gst::Element, MediaError> {
    let e = make("capsfilter", name)?;
    e.set_property("caps", caps);
    Ok(e)
}

/// Sets an enum or flags property from its nick (e.g. x264enc `tune=zerolatency`).
pub fn set_nick(e: &gst::Element, prop: &str, nick: &str) {
    e.set_property_from_str(prop, nick);
}
