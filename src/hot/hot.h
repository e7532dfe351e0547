/* Hot box: the exported allocation API (hakmem_* and, in the shared
 * library, the standard names) and the thread cache it owns. */
#ifndef HM_HOT_H
#define HM_HOT_H

#include "../../include/hakmem.h"
#include "../refill/refill.h"

/* The calling thread's cache (for set-up and reports; not a fast path). */
struct hm_tcache *hm_tcache_self(void);

#endif
