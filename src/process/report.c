/* The in-process view: per-class and process counters, and the report
 * that HAKMEM_STATS=1 prints at exit. */
#include <string.h>

#include "../../include/hakmem.h"
#include "../ace/ace.h"
#include "../diag/diag.h"
#include "../hot/hot.h"
#include "../refill/refill.h"
#include "../segment/segment.h"

const char *hakmem_version(void)
{
    return "hakmem " HAKMEM_VERSION;
}

unsigned hakmem_class_count(void)
{
    return HM_NUM_CLASSES;
}

int hakmem_class_info(unsigned cls, struct hakmem_class_info *out)
{
    if (cls >= HM_NUM_CLASSES || !out)
        return -1;
    struct hm_class_counters c;
    hm_class_counters(cls, hm_tcache_self(), &c);
    struct hm_refill_bounds b = hm_refill_bounds(cls);
    memset(out, 0, sizeof *out);
    out->size_class = cls;
    out->block_size = (uint32_t)hm_size_class_size(cls);
    out->refill_count = hm_refill_count_load(cls);
    out->refill_default = b.def;
    out->refill_min = b.min;
    out->refill_max = b.max;
    out->refills = c.refills;
    out->blocks_refilled = c.blocks_refilled;
    out->flushes = c.flushes;
    out->blocks_flushed = c.blocks_flushed;
    out->remote_frees = c.remote_frees;
    out->blocks_cached = c.blocks_cached;
    out->ace_events = hm_ace_class_events(cls);
    out->ace_drops = c.ace_drops;
    out->blocks_drained = c.blocks_drained;
    return 0;
}

void hakmem_stats(struct hakmem_stats *out)
{
    struct hm_heap_counters h;
    hm_heap_counters(&h);
    memset(out, 0, sizeof *out);
    out->bytes_mapped = atomic_load(&hm_segment_counters.bytes_mapped);
    out->segments = atomic_load(&hm_segment_counters.segments);
    out->large_blocks = atomic_load(&hm_segment_counters.large_blocks);
    out->large_bytes = atomic_load(&hm_segment_counters.large_bytes);
    out->threads_live = h.threads_live;
    out->threads_exited = h.threads_exited;
    out->segments_abandoned = h.segments_abandoned;
    out->segments_adopted = h.segments_adopted;
    out->bytes_purged = atomic_load(&hm_segment_counters.bytes_purged);
}

static void field(struct hm_line *l, const char *name, uint64_t v)
{
    hm_line_str(l, " ");
    hm_line_str(l, name);
    hm_line_str(l, "=");
    hm_line_u64(l, v, 0);
}

void hakmem_stats_print(int fd)
{
    struct hm_line l = { .len = 0 };
    hm_line_str(&l, "hakmem stats: class  size  refill  refills  blocks_refilled  flushes  blocks_flushed  remote_frees  cached  drained\n");
    hm_line_write(&l, fd);
    for (unsigned c = 0; c < HM_NUM_CLASSES; c++) {
        struct hakmem_class_info ci;
        hakmem_class_info(c, &ci);
        if (!ci.refills && !ci.remote_frees)
            continue;
        hm_line_str(&l, "hakmem stats: ");
        hm_line_u64(&l, c, 5);
        hm_line_u64(&l, ci.block_size, 7);
        hm_line_u64(&l, ci.refill_count, 7);
        hm_line_u64(&l, ci.refills, 9);
        hm_line_u64(&l, ci.blocks_refilled, 17);
        hm_line_u64(&l, ci.flushes, 9);
        hm_line_u64(&l, ci.blocks_flushed, 16);
        hm_line_u64(&l, ci.remote_frees, 14);
        hm_line_u64(&l, ci.blocks_cached, 8);
        hm_line_u64(&l, ci.blocks_drained, 9);
        hm_line_str(&l, "\n");
        hm_line_write(&l, fd);
    }
    struct hakmem_stats s;
    hakmem_stats(&s);
    hm_line_str(&l, "hakmem stats: totals");
    field(&l, "bytes_mapped", s.bytes_mapped);
    field(&l, "segments", s.segments);
    field(&l, "large_blocks", s.large_blocks);
    field(&l, "large_bytes", s.large_bytes);
    field(&l, "threads_live", s.threads_live);
    field(&l, "threads_exited", s.threads_exited);
    field(&l, "abandoned", s.segments_abandoned);
    field(&l, "adopted", s.segments_adopted);
    field(&l, "purged", s.bytes_purged);
    /* Idle threads' heaps tidied by another thread (see hm_heaps_tidy_idle). */
    struct hm_heap_counters h;
    hm_heap_counters(&h);
    field(&l, "heaps_tidied", h.heaps_tidied);
    /* Heaps exited for threads gone without exiting them (see orphan_exit). */
    field(&l, "orphaned", h.heaps_orphaned);
    /* Exited threads' heaps kept for reuse: resident, and given back. */
    field(&l, "heaps_free", h.heaps_free);
    field(&l, "heaps_released", h.heaps_released);
    /* Segments of exited threads emptied by others' frees, given back
     * without adoption (see hm_abandoned_sweep). */
    field(&l, "swept", h.segments_swept);
    /* 2 MiB halves of big heaps' segments asking for huge pages now. */
    field(&l, "huge_halves", atomic_load(&hm_segment_counters.huge_halves));
    /* Without the page map (its address space refused) every free takes
     * the slow path. */
    hm_line_str(&l, hm_pagemap.entries ? " page_map=on" : " page_map=off");
    /* Whether the ACE thread runs now (HAKMEM_ACE=1 starts it at load). */
    struct hm_ace_counters ac;
    hm_ace_counters(&ac);
    hm_line_str(&l, ac.running ? " ace=running" : hm_ace_on ? " ace=not_running" : " ace=off");
    /* Events the ACE thread drained, and those a full ring dropped. */
    field(&l, "ace_events", ac.events);
    field(&l, "ace_drops", ac.drops);
    hm_line_str(&l, "\n");
    hm_line_write(&l, fd);
}
