/* The checks the C test programs share: each returns 1 from the calling function, saying
 * where and tensorlift's last error. */
#ifndef TENSORLIFT_TEST_EXPECT_H
#define TENSORLIFT_TEST_EXPECT_H

#include <stdio.h>

#include "tensorlift.h"

#define CHECK(call)                                                                          \
    do {                                                                                     \
        TlStatus s_ = (call);                                                                \
        if (s_ != TL_STATUS_OK) {                                                            \
            fprintf(stderr, "%s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #call, (int)s_, \
                    tl_last_error());                                                        \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

#define EXPECT(cond)                                                                      \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "%s:%d: expected %s (%s)\n", __FILE__, __LINE__, #cond, tl_last_error()); \
            return 1;                                                                     \
        }                                                                                 \
    } while (0)

#endif
