/* Size classes: the one place that maps a request size to a class and back.
 *
 * Classes are 16..128 in steps of 16, then eight per power of two up to
 * 8 KiB (waste at most 12.5%), then four per power of two up to
 * HM_MAX_CLASS_SIZE (128 KiB; waste at most 25%), so every block is a
 * multiple of 16.  Above 8 KiB a span holds a few blocks, and each class
 * keeps its own spans, bin and stash: fewer classes there hold less memory
 * than finer rounding would save (scripts/gen_size_classes.py says how
 * much).  The tables are generated at build time by that script, so the
 * hot path never depends on run-time initialisation. */
#ifndef HM_SIZE_CLASS_H
#define HM_SIZE_CLASS_H

#include <stddef.h>
#include <stdint.h>

#include "size_class_table.h"

#define HM_ALIGNMENT       16u
#define HM_SMALL_LOOKUP_MAX 1024u          /* sizes served by the byte table */
#define HM_MAX_CLASS_SIZE  (128u * 1024u)  /* above this: a large block */

/* The class of each size up to HM_SMALL_LOOKUP_MAX, times two: malloc's
 * fast path indexes a thread cache's 16-byte bins with it, and an address
 * scales an index by at most 8. */
extern const uint8_t  hm_small_bin_slot[65] __attribute__((visibility("hidden")));
extern const uint32_t hm_class_size[HM_NUM_CLASSES];
extern const uint8_t  hm_class_span_pages[HM_NUM_CLASSES];
extern const uint32_t hm_class_recip32[HM_NUM_CLASSES];   /* ceil(2^32 / size) */

/* The bin slot (class times two) of a size of at most HM_SMALL_LOOKUP_MAX:
 * one table load. */
static inline unsigned hm_small_size_slot(size_t size)
{
    return hm_small_bin_slot[(size + 15) >> 4];
}

/* Class of a size of at most HM_SMALL_LOOKUP_MAX. */
static inline unsigned hm_small_size_class(size_t size)
{
    return hm_small_size_slot(size) >> 1;
}

/* Class of any size up to HM_MAX_CLASS_SIZE, by formula: for s = size - 1
 * above 127, the class is the position of its top bit (one group per power
 * of two) plus its next three bits (groups of eight), or from
 * HM_COARSE_SHIFT on its next two (groups of four). */
static inline unsigned hm_size_class(size_t size)
{
    if (size <= HM_SMALL_LOOKUP_MAX)
        return hm_small_size_class(size);
    size_t s = size - 1;
    unsigned top = 63u - (unsigned)__builtin_clzll(s);
    if (top < HM_COARSE_SHIFT)
        return 8u + (top - 7u) * 8u + (unsigned)((s >> (top - 3u)) - 8u);
    return HM_COARSE_FIRST + (top - HM_COARSE_SHIFT) * 4u + (unsigned)((s >> (top - 2u)) - 4u);
}

static inline size_t hm_size_class_size(unsigned cls)
{
    return hm_class_size[cls];
}

#endif
