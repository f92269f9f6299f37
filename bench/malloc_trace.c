// LD_PRELOAD heap counter for bench/trace_step.py: gcc -O2 -shared -fPIC -o /tmp/malloc_trace.so bench/malloc_trace.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <malloc.h>
// Counts live heap bytes (blocks >= 1 KB) while on; records the live set at the peak.
static void *(*rmalloc)(size_t); static void (*rfree)(void*); static void *(*rcalloc)(size_t,size_t);
static void *(*rrealloc)(void*,size_t); static int (*rmemalign)(void**,size_t,size_t);
static void *(*raligned)(size_t,size_t);
static volatile int on = 0; static long live = 0, peak = 0; static int busy = 0;
#define N 200000
static void *ptrs[N]; static size_t szs[N]; static int used = 0;
static void *pk_p[4096]; static size_t pk_s[4096]; static int pk_n = 0;
static long seq = 0; static long pk_seq = 0;
static long order[N];
static long events = 0;
static void init(void){ if(rmalloc) return; rmalloc=dlsym(RTLD_NEXT,"malloc"); rfree=dlsym(RTLD_NEXT,"free");
 rcalloc=dlsym(RTLD_NEXT,"calloc"); rrealloc=dlsym(RTLD_NEXT,"realloc"); rmemalign=dlsym(RTLD_NEXT,"posix_memalign"); raligned=dlsym(RTLD_NEXT,"aligned_alloc");}
static void add(void*p,size_t s){ if(!on||!p||s<1024||busy) return; busy=1;
 int i; for(i=0;i<used;i++) if(!ptrs[i]) break; if(i==used){ if(used>=N){busy=0;return;} used++; }
 ptrs[i]=p; szs[i]=s; order[i]=seq++; live+=s; events++;
 if(live>peak){ peak=live; pk_seq=seq; pk_n=0; for(int j=0;j<used && pk_n<4096;j++) if(ptrs[j]){pk_p[pk_n]=ptrs[j]; pk_s[pk_n]=szs[j]; pk_n++;} }
 busy=0; }
static void del(void*p){ if(!on||!p||busy) return; for(int i=0;i<used;i++) if(ptrs[i]==p){ live-=szs[i]; ptrs[i]=0; return; } }
void *malloc(size_t s){ init(); void*p=rmalloc(s); add(p,s); return p; }
void *calloc(size_t a,size_t b){ if(!rcalloc){ static char buf[65536]; static size_t off=0; void*p=buf+off; off+=(a*b+15)&~15; return p;} void*p=rcalloc(a,b); add(p,a*b); return p; }
void free(void*p){ init(); del(p); rfree(p); }
void *realloc(void*p,size_t s){ init(); del(p); void*q=rrealloc(p,s); add(q,s); return q; }
int posix_memalign(void**r,size_t a,size_t s){ init(); int x=rmemalign(r,a,s); if(!x) add(*r,s); return x; }
void *aligned_alloc(size_t a,size_t s){ init(); void*p=raligned(a,s); add(p,s); return p; }
void mt_on(void){ live=0; peak=0; pk_n=0; used=0; seq=0; events=0; on=1; }
long mt_off(void){ on=0; return peak; }
long mt_live(void){ return live; }
long mt_peak_n(void){ return pk_n; }
long mt_peak_size(int i){ return (long)pk_s[i]; }
long mt_events(void){ return events; }
