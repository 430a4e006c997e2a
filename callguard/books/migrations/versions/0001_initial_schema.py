"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from callguard.books.database import table_options

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# MySQL/MariaDB's DATETIME drops the microseconds without fsp=6 (MySQL support came after
# this revision shipped: SQLite and PostgreSQL get the type they always had).
_AT = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')


def upgrade() -> None:
    options = table_options(op.get_bind())  # MySQL/MariaDB: utf8mb4, byte for byte
    op.create_table('accounts',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('plan', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('block_reason', sa.String(length=200), nullable=True),
    sa.Column('max_channels', sa.Integer(), nullable=False),
    sa.Column('cps_limit', sa.Integer(), nullable=False),
    sa.Column('balance', sa.BigInteger(), nullable=False),
    sa.Column('credit_limit', sa.BigInteger(), nullable=False),
    sa.Column('warn_below', sa.BigInteger(), nullable=True),
    sa.Column('warn_at', sa.BigInteger(), nullable=True),
    sa.Column('email', sa.String(length=254), nullable=True),
    sa.Column('payment_method', sa.String(length=200), nullable=True),
    sa.Column('auto_topup_below', sa.BigInteger(), nullable=True),
    sa.Column('auto_topup_amount', sa.BigInteger(), nullable=True),
    sa.Column('created_at', _AT, nullable=False),
    sa.Column('updated_at', _AT, nullable=False),
    sa.CheckConstraint("kind IN ('prepaid', 'postpaid')", name='ck_accounts_kind'),
    sa.CheckConstraint("status IN ('active', 'blocked')", name='ck_accounts_status'),
    sa.PrimaryKeyConstraint('id'),
    **options,
    )
    op.create_table('rate_plans',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_at', _AT, nullable=False),
    sa.PrimaryKeyConstraint('name'),
    **options,
    )
    op.create_table('cdrs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('session', sa.String(length=200), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=200), nullable=False),
    sa.Column('node', sa.String(length=100), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('rate_per_min', sa.BigInteger(), nullable=False),
    sa.Column('connect_fee', sa.BigInteger(), nullable=False),
    sa.Column('initial_increment', sa.Integer(), nullable=False),
    sa.Column('subsequent_increment', sa.Integer(), nullable=False),
    sa.Column('setup_ms', sa.BigInteger(), nullable=False),
    sa.Column('answer_ms', sa.BigInteger(), nullable=True),
    sa.Column('end_ms', sa.BigInteger(), nullable=False),
    sa.Column('duration', sa.Integer(), nullable=False),
    sa.Column('billed', sa.Integer(), nullable=False),
    sa.Column('cost', sa.BigInteger(), nullable=False),
    sa.Column('cause', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session'),
    **options,
    )
    with op.batch_alter_table('cdrs', schema=None) as batch_op:
        batch_op.create_index('ix_cdrs_account_setup', ['account', 'setup_ms'], unique=False)

    op.create_table('ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=True),
    sa.Column('session', sa.String(length=200), nullable=True),
    sa.Column('created_at', _AT, nullable=False),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key'),
    **options,
    )
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_account'), ['account'], unique=False)

    op.create_table('notifications',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('account', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', _AT, nullable=False),
    sa.Column('sent_at', _AT, nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.ForeignKeyConstraint(['account'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key'),
    **options,
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_notifications_account'), ['account'], unique=False)

    op.create_table('rates',
    sa.Column('plan', sa.String(length=64), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('description', sa.String(length=200), nullable=False),
    sa.Column('rate_per_min', sa.BigInteger(), nullable=False),
    sa.Column('connect_fee', sa.BigInteger(), nullable=False),
    sa.Column('initial_increment', sa.Integer(), nullable=False),
    sa.Column('subsequent_increment', sa.Integer(), nullable=False),
    sa.Column('blocked', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['plan'], ['rate_plans.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('plan', 'direction', 'prefix'),
    **options,
    )


def downgrade() -> None:
    op.drop_table('rates')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_notifications_account'))

    op.drop_table('notifications')
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_account'))

    op.drop_table('ledger')
    with op.batch_alter_table('cdrs', schema=None) as batch_op:
        batch_op.drop_index('ix_cdrs_account_setup')

    op.drop_table('cdrs')
    op.drop_table('rate_plans')
    op.drop_table('accounts')
