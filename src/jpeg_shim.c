/*
 * libjpeg decoding with Pillow's settings, behind a setjmp error boundary (see src/jpeg.rs).
 *
 * libjpeg reports fatal errors by calling error_exit, which must not return. Rust cannot
 * catch a longjmp, so the boundary lives here in C, as in Pillow's own JpegDecode.c: every
 * entry point sets a jmp_buf, the error handler longjmps back to it, and the entry point then
 * destroys the decompressor and returns a nonzero status with libjpeg's message. Nothing in
 * this file calls back into Rust.
 *
 * Pillow 13 (src/libImaging/JpegDecode.c) decodes with libjpeg-turbo's defaults: islow IDCT,
 * fancy upsampling, block smoothing on; out_color_space GRAYSCALE / RGB / CMYK for 1 / 3 / 4
 * components; warnings are silenced and decoding goes on. It feeds data through a suspending
 * source, so running out of data before the last scanline is an error ("image file is
 * truncated"), while a missing EOI after the last scanline is accepted. Here the whole file is
 * in memory (jpeg_mem_src), whose end-of-data behaviour is a JWRN_JPEG_EOF warning followed by
 * a fake EOI; that warning is therefore made fatal until every scanline has been read.
 */

#include <limits.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "jpeglib.h"
#include "jerror.h"

#define ELITE_JPEG_MSG_LEN 200

/* What the header says; filled by elite_jpeg_read_header. */
typedef struct {
  uint32_t width;
  uint32_t height;
  int32_t components;
  int32_t color_space; /* J_COLOR_SPACE libjpeg inferred for the file */
  int32_t progressive;
  int32_t saw_adobe;
  int32_t adobe_transform;
  /* The first APP1 "Exif\0\0" payload after those 6 bytes (TIFF data), truncated to fit. */
  uint8_t *exif;
  size_t exif_capacity;
  size_t exif_len;
} elite_jpeg_header;

/* Limits for elite_jpeg_decode. */
typedef struct {
  int32_t max_scans;         /* refuse progressive files with more scans than this */
  uint64_t max_memory_bytes; /* libjpeg's max_memory_to_use (its large buffers) */
} elite_jpeg_limits;

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[ELITE_JPEG_MSG_LEN];
  int reading_scanlines; /* 1 until the last scanline is out: end of data is then fatal */
} shim_error;

typedef struct {
  struct jpeg_progress_mgr pub;
  int max_scans;
  int too_many_scans;
} shim_progress;

static void shim_error_exit(j_common_ptr cinfo) {
  shim_error *err = (shim_error *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* Warnings (msg_level -1) are ignored as Pillow ignores them, except running out of data
 * while scanlines remain, which Pillow reports as a truncated file. Trace messages are
 * dropped. */
static void shim_emit_message(j_common_ptr cinfo, int msg_level) {
  shim_error *err = (shim_error *)cinfo->err;
  if (msg_level < 0) {
    cinfo->err->num_warnings++;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF && err->reading_scanlines) {
      snprintf(err->message, sizeof err->message,
               "the file ends before the image data does (truncated)");
      longjmp(err->jump, 1);
    }
  }
}

static void shim_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* Called by libjpeg while it reads scans: bounds the work of a file with very many scans. */
static void shim_progress_monitor(j_common_ptr cinfo) {
  shim_progress *progress = (shim_progress *)cinfo->progress;
  j_decompress_ptr d = (j_decompress_ptr)cinfo;
  if (progress->max_scans > 0 && d->input_scan_number > progress->max_scans) {
    shim_error *err = (shim_error *)cinfo->err;
    progress->too_many_scans = 1;
    snprintf(err->message, sizeof err->message,
             "more than %d progressive scans (a decoding-time bomb)", progress->max_scans);
    longjmp(err->jump, 1);
  }
}

static void shim_init(struct jpeg_decompress_struct *cinfo, shim_error *err) {
  cinfo->err = jpeg_std_error(&err->pub);
  err->pub.error_exit = shim_error_exit;
  err->pub.emit_message = shim_emit_message;
  err->pub.output_message = shim_output_message;
  err->message[0] = '\0';
  err->reading_scanlines = 1;
}

static void copy_message(const shim_error *err, char *message, size_t message_len) {
  if (message != NULL && message_len > 0) {
    snprintf(message, message_len, "%s", err->message[0] ? err->message : "libjpeg error");
  }
}

/* Status codes shared with src/jpeg.rs. */
#define ELITE_JPEG_OK 0
#define ELITE_JPEG_ERROR 1
#define ELITE_JPEG_BAD_BUFFER 2

int elite_jpeg_read_header(const uint8_t *data, size_t len, elite_jpeg_header *header,
                           char *message, size_t message_len) {
  /* cinfo and err live in memory (their addresses are passed on), so they keep their
   * values across the longjmp, as in libjpeg's example.c. */
  struct jpeg_decompress_struct cinfo;
  shim_error err;
  jpeg_saved_marker_ptr marker;

  memset(&cinfo, 0, sizeof cinfo);
  shim_init(&cinfo, &err);
  if (setjmp(err.jump)) {
    copy_message(&err, message, message_len);
    jpeg_destroy_decompress(&cinfo);
    return ELITE_JPEG_ERROR;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, (unsigned long)len);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&cinfo, TRUE);

  header->width = cinfo.image_width;
  header->height = cinfo.image_height;
  header->components = cinfo.num_components;
  header->color_space = (int32_t)cinfo.jpeg_color_space;
  header->progressive = cinfo.progressive_mode ? 1 : 0;
  header->saw_adobe = cinfo.saw_Adobe_marker ? 1 : 0;
  header->adobe_transform = cinfo.Adobe_transform;
  header->exif_len = 0;
  for (marker = cinfo.marker_list; marker != NULL; marker = marker->next) {
    if (marker->marker == JPEG_APP0 + 1 && marker->data_length >= 6 &&
        memcmp(marker->data, "Exif\0\0", 6) == 0) {
      size_t n = marker->data_length - 6;
      if (n > header->exif_capacity) n = header->exif_capacity;
      if (header->exif != NULL && n > 0) memcpy(header->exif, marker->data + 6, n);
      header->exif_len = n;
      break;
    }
  }
  jpeg_destroy_decompress(&cinfo);
  return ELITE_JPEG_OK;
}

/*
 * Decodes into `out` (width × height × channels bytes, row-major), where channels is 1, 3 or
 * 4 for out_color_space GRAYSCALE, RGB or CMYK, chosen from the component count as Pillow
 * chooses its mode. The caller has checked the header's size against its limits and sized
 * `out` from it; a header that differs now is refused.
 */
int elite_jpeg_decode(const uint8_t *data, size_t len, const elite_jpeg_limits *limits,
                      uint8_t *out, size_t out_len, uint32_t expect_width,
                      uint32_t expect_height, int32_t expect_channels, char *message,
                      size_t message_len) {
  struct jpeg_decompress_struct cinfo;
  shim_error err;
  shim_progress progress;
  size_t row_bytes;

  memset(&cinfo, 0, sizeof cinfo);
  memset(&progress, 0, sizeof progress);
  shim_init(&cinfo, &err);
  if (setjmp(err.jump)) {
    copy_message(&err, message, message_len);
    jpeg_destroy_decompress(&cinfo);
    return ELITE_JPEG_ERROR;
  }
  jpeg_create_decompress(&cinfo);
  /* 0 (or a cap beyond `long`) leaves libjpeg's default, no cap: a negative value would make
   * it ask for the backing store this build does not have. */
  if (limits->max_memory_bytes > 0 && limits->max_memory_bytes < (uint64_t)LONG_MAX) {
    cinfo.mem->max_memory_to_use = (long)limits->max_memory_bytes;
  }
  progress.pub.progress_monitor = shim_progress_monitor;
  progress.max_scans = limits->max_scans;
  cinfo.progress = &progress.pub;
  jpeg_mem_src(&cinfo, data, (unsigned long)len);
  jpeg_read_header(&cinfo, TRUE);

  switch (cinfo.num_components) {
    case 1: cinfo.out_color_space = JCS_GRAYSCALE; break;
    case 3: cinfo.out_color_space = JCS_RGB; break;
    case 4: cinfo.out_color_space = JCS_CMYK; break;
    default:
      snprintf(err.message, sizeof err.message, "%d color components", cinfo.num_components);
      longjmp(err.jump, 1);
  }
  /* libjpeg's defaults, which Pillow keeps: stated so a changed default cannot creep in. */
  cinfo.dct_method = JDCT_ISLOW;
  cinfo.do_fancy_upsampling = TRUE;
  cinfo.do_block_smoothing = TRUE;

  if (cinfo.image_width != expect_width || cinfo.image_height != expect_height ||
      cinfo.num_components != expect_channels) {
    jpeg_destroy_decompress(&cinfo);
    return ELITE_JPEG_BAD_BUFFER;
  }
  row_bytes = (size_t)expect_width * (size_t)expect_channels;
  if (row_bytes == 0 || out_len / row_bytes < (size_t)expect_height) {
    jpeg_destroy_decompress(&cinfo);
    return ELITE_JPEG_BAD_BUFFER;
  }

  jpeg_start_decompress(&cinfo);
  if (cinfo.output_width != expect_width || cinfo.output_height != expect_height ||
      cinfo.output_components != expect_channels) {
    jpeg_destroy_decompress(&cinfo);
    return ELITE_JPEG_BAD_BUFFER;
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out + (size_t)cinfo.output_scanline * row_bytes;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  err.reading_scanlines = 0;
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return ELITE_JPEG_OK;
}
