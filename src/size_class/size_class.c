#include "size_class.h"

const uint8_t hm_small_bin_slot[65] = { HM_SIZE_CLASS_SMALL_BIN_SLOT };
const uint32_t hm_class_size[HM_NUM_CLASSES] = { HM_SIZE_CLASS_SIZES };
const uint8_t hm_class_span_pages[HM_NUM_CLASSES] = { HM_SIZE_CLASS_SPAN_PAGES };
const uint32_t hm_class_recip32[HM_NUM_CLASSES] = { HM_SIZE_CLASS_RECIP32 };
